"""python -m tgdp.ablate: variants, paired confidence intervals, and a 2-variant x 2-seed toy study
(tiny shapes, 3 steps, a 8 + 6 clip generated corpus) that writes its tables and plot, skips
finished runs, resumes a killed one from its checkpoint and refuses a folder made with other settings."""

import json
import math
import subprocess
import sys

import pytest

from tgdp import configs
from tgdp.ablate import report, stats
from tgdp.ablate.__main__ import _main as ablate_main
from tgdp.ablate.runner import RunSpec, Study, run_config, to_toml, torchrun_command
from tgdp.ablate.variants import BUILTIN, load_variants, resolve
from tgdp.cli import UserError, run

from _train_helpers import REPO, env

SMALL = ["--preset", "tiny", "--model.depth", "2", "--model.modality_specific_depth", "1", "--model.img_size", "32",
         "--model.audio_length", "64", "--model.decoder_depth", "1", "--train.batch_size", "4",
         "--train.log_every", "1", "--train.ckpt_every", "1", "--data.num_workers", "0", "--eval.batch_videos", "3"]


# ----------------------------------------------------------------------------- statistics

def test_t_quantile_against_closed_forms_and_tables():
    # df = 1: Cauchy, t = tan(pi (p - 1/2)); df = 2: t = (2p - 1) sqrt(2 / (4 p (1 - p)))
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9)
    # printed tables (two-sided 95 %)
    for df, t in ((3, 3.182446305284263), (4, 2.7764451051977987), (9, 2.2621571627409915),
                  (29, 2.045229642132703)):
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-8)
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, abs=1e-6)   # normal limit
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.7764451051977987, abs=1e-8)


def test_betainc_equals_the_binomial_tail():
    # I_x(a, b) = P(Binomial(a + b - 1, x) >= a) for integer a, b
    for a, b, x in ((1, 1, 0.3), (2, 3, 0.4), (5, 2, 0.9), (7, 7, 0.5), (3, 12, 0.05)):
        n = a + b - 1
        tail = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(a, n + 1))
        assert stats.betainc(a, b, x) == pytest.approx(tail, rel=1e-10, abs=1e-14)
    with pytest.raises(ValueError, match="x in"):
        stats.betainc(1, 1, 1.5)


def test_paired_ci_written_out():
    var = {0: 30.0, 1: 27.5, 2: 31.0, 3: 99.0}     # seed 3 has no baseline: not paired
    base = {0: 25.0, 1: 26.0, 2: 24.5}
    d = [5.0, 1.5, 6.5]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    hw = 4.302652729911275 * sd / math.sqrt(3)     # t(0.975, 2) from the table
    c = stats.paired_ci(var, base)
    assert c["seeds"] == [0, 1, 2] and c["diffs"] == d
    assert c["mean"] == pytest.approx(mean) and c["std"] == pytest.approx(sd)
    assert c["half_width"] == pytest.approx(hw, rel=1e-9)
    assert (c["low"], c["high"]) == (pytest.approx(mean - hw), pytest.approx(mean + hw))
    assert c["excludes_zero"] is (mean - hw > 0) and c["resolves"] is (hw < 3.0)
    one = stats.paired_ci({0: 1.0}, {0: 0.5})
    assert one["n"] == 1 and one["half_width"] is None and one["mean"] == 0.5


# ----------------------------------------------------------------------------- variants and configs

@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_builtin_variants_resolve(preset):
    base = configs.PRESETS[preset]()
    cfgs = {name: resolve(base, v) for name, v in BUILTIN.items()}
    assert set(cfgs) >= {"baseline", "dual_random", "tgdp", "tgdp_gumbel", "tgdp_no_distill", "official_compat"}
    assert not cfgs["baseline"].masking.dual_path and cfgs["baseline"].loss.w_dis == 0
    assert cfgs["dual_random"].masking.guide == "random" and cfgs["dual_random"].loss.w_dis == 0
    assert cfgs["tgdp"].masking.guide == "distinct" and cfgs["tgdp"].loss.w_dis == base.loss.w_dis > 0
    assert cfgs["tgdp_gumbel"].masking.guide == "gumbel"
    assert cfgs["tgdp_no_distill"].masking.guide == "distinct" and cfgs["tgdp_no_distill"].loss.w_dis == 0
    assert cfgs["official_compat"].masking.official_compat
    for cfg in cfgs.values():   # equal compute: the variants differ only in masking / loss
        assert (cfg.train, cfg.data, cfg.eval, cfg.model) == (base.train, base.data, base.eval, base.model)


def test_variants_file(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('[variants.con75]\ndescription = "75 % contrastive mask"\nbase = "tgdp"\nmasking.con_ratio = 0.75\n'
                 '[variants.warm]\n"train.warmup_frac" = 0.2\n')
    known = load_variants(f)
    assert known["con75"].overrides == {"masking.guide": "distinct", "masking.con_ratio": 0.75}
    assert known["warm"].overrides == {"train.warmup_frac": 0.2}
    assert resolve(configs.tiny(), known["con75"]).masking.con_ratio == 0.75
    for text, match in (('[variants.x]\ntrain.steps = 5\n', "train.steps, which every variant shares"),
                        ('[variants.x]\neval.chunk = 5\n', "eval.chunk"),
                        ('[variants.x]\nbase = "nope"\n', "not a known variant"),
                        ('[other]\na = 1\n', r"only \[variants.<name>\]"),
                        ('[variants.x\n', "not valid TOML")):
        f.write_text(text)
        with pytest.raises(UserError, match=match):
            load_variants(f)
    f.write_text('[variants.x]\nmasking.con_ratio = 2.0\n')
    with pytest.raises(configs.ConfigError, match="variant 'x'.*masking.con_ratio"):
        resolve(configs.tiny(), load_variants(f)["x"])


def test_run_config_toml_round_trip(tmp_path):
    base = configs.load("tiny", None, ["--train.betas", "0.9,0.95", "--train.lr", "1e-05"])
    study = Study(out=tmp_path, data=str(tmp_path / "d"), val_data=str(tmp_path / "v"), base=base, steps=7,
                  seeds=(0, 1))
    cfg = run_config(study, RunSpec(BUILTIN["baseline"], 1))
    assert (cfg.train.seed, cfg.train.steps, cfg.train.resume) == (1, 7, True)
    assert cfg.train.out_dir == str(tmp_path / "runs" / "baseline" / "seed-1") and cfg.data.root == study.data
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg))
    assert configs.load("paper", f) == cfg
    assert torchrun_command(f, 2)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                          "-m", "tgdp.train", "--config", str(f)]


# ----------------------------------------------------------------------------- the toy study

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes on a shared 2-core box: one intra-op thread (measured under load: 3x faster)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tgdp.data.synthetic import ensure_demo

    out = ensure_demo(tmp_path_factory.mktemp("corpus"), n_train=8, n_val=6, n_classes=2, workers=0,
                      progress=False)
    return out / "train", out / "val"


def _argv(corpus, out, seeds=2, steps=3, *more):
    return ["--data", str(corpus[0]), "--val-data", str(corpus[1]), "--variants", "baseline,tgdp",
            "--seeds", str(seeds), "--steps", str(steps), "--out", str(out), *SMALL, *more]


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert ablate_main(_argv(corpus, out)) == 0
    return out


def _losses(run_folder):
    return {r["step"]: r for r in map(json.loads, (run_folder / "metrics.jsonl").read_text().splitlines())}


def test_toy_study_writes_tables_and_plot(study):
    summary = json.loads((study / "ablation.json").read_text())
    v = summary["variants"]
    assert list(v) == ["baseline", "tgdp"] and summary["settings"]["baseline"] == "baseline"
    assert summary["settings"]["num_val"] == 6 and summary["settings"]["steps"] == 3
    for name in v:
        assert v[name]["seeds_done"] == [0, 1]
        for key in ("v2a_R@1", "a2v_R@1", "v2a_R@5", "a2v_R@5", "probe"):
            assert v[name]["metrics"][key]["n"] == 2
    # the single pass costs less than the dual path with its teacher
    assert 0 < v["baseline"]["flops"]["per_step"] < v["tgdp"]["flops"]["per_step"]
    assert v["baseline"]["flops"]["teacher_per_step"] == 0 < v["tgdp"]["flops"]["teacher_per_step"]
    md = (study / "ablation.md").read_text()
    assert "| **baseline** | 2 |" in md and "| tgdp | 2 |" in md and "Difference to `baseline`" in md
    assert "paired t-interval" in md and "resolves 3 pt R@1?" in md
    png = (study / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # equal data, init and reconstruction masks per seed: the first step's reconstruction loss
    # (before any update) is the same in both variants, and differs between seeds
    first = {(n, s): _losses(study / "runs" / n / f"seed-{s}")[1]["loss_rec"] for n in v for s in (0, 1)}
    assert first[("baseline", 0)] == first[("tgdp", 0)] and first[("baseline", 1)] == first[("tgdp", 1)]
    assert first[("baseline", 0)] != first[("baseline", 1)]


def test_toy_study_ci_against_the_written_formula(study):
    summary = json.loads((study / "ablation.json").read_text())
    runs = {n: {int(s): r for s, r in summary["variants"][n]["runs"].items()} for n in ("baseline", "tgdp")}
    t = math.tan(math.pi * 0.475)     # t(0.975, df = 1): two seeds
    for key in report.CI_METRICS:
        path = report.METRICS[key][1]
        val = lambda r: r[path[0]][path[1]] if len(path) == 2 else r[path[0]][path[1]][path[2]]  # noqa: E731
        d = [val(runs["tgdp"][s]) - val(runs["baseline"][s]) for s in (0, 1)]
        mean = (d[0] + d[1]) / 2
        sd = abs(d[0] - d[1]) / math.sqrt(2)          # sample std of two values
        c = summary["variants"]["tgdp"]["vs_baseline"][key]
        assert c["mean"] == pytest.approx(mean, abs=1e-9) and c["std"] == pytest.approx(sd, abs=1e-9)
        assert c["half_width"] == pytest.approx(t * sd / math.sqrt(2), abs=1e-7)
        assert c["low"] == pytest.approx(mean - t * sd / math.sqrt(2), abs=1e-7)
        m = summary["variants"]["tgdp"]["metrics"][key]
        a = [val(runs["tgdp"][s]) for s in (0, 1)]
        assert m["mean"] == pytest.approx(sum(a) / 2) and m["std"] == pytest.approx(abs(a[0] - a[1]) / math.sqrt(2))


def test_toy_study_resume_skips_and_continues(study, corpus, monkeypatch, capsys):
    import tgdp.training.trainer as loop   # where Trainer looks train_step up

    results = sorted(study.glob("runs/*/seed-*/result.json"))
    assert len(results) == 4
    before = {p: p.stat().st_mtime_ns for p in results}
    real_step = loop.train_step

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "train_step", no_training)
    capsys.readouterr()
    assert ablate_main(_argv(corpus, study)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "] run " in ln]
    assert len(lines) == 4 and all("finished earlier, skipped" in ln for ln in lines)
    assert {p: p.stat().st_mtime_ns for p in results} == before

    # a third seed, killed after two of its three steps (checkpoint every step) ...
    calls = {"n": 0}

    def killed_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "train_step", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ablate_main(_argv(corpus, study, 3))
    killed = study / "runs" / "baseline" / "seed-2"
    assert not (killed / "result.json").exists() and (killed / "checkpoints").is_dir()
    # ... continues from its checkpoint (only the missing step is trained), here in a child process
    # of --jobs 2, beside the fresh run of the other variant
    monkeypatch.setattr(loop, "train_step", real_step)
    capsys.readouterr()
    assert ablate_main(_argv(corpus, study, 3, 3, "--jobs", "2")) == 0
    out = capsys.readouterr().out
    assert out.count(": started (log ") == 2 and "run 5/6 baseline seed 2: done in" in out
    assert "resumed from step-00000002.pt at step 2" in (killed / "train.log").read_text()
    assert not (killed / "ablate.lock").exists()
    res = json.loads((killed / "result.json").read_text())
    assert res["resumed_from"] == 2 and res["steps"] == 3
    assert sorted(_losses(killed)) == [1, 2, 3]
    summary = json.loads((study / "ablation.json").read_text())
    assert summary["variants"]["tgdp"]["seeds_done"] == [0, 1, 2]
    assert summary["variants"]["tgdp"]["vs_baseline"]["v2a_R@1"]["n"] == 3


def test_toy_study_refuses_other_settings(study, corpus, capsys):
    assert run("tgdp.ablate", ablate_main, _argv(corpus, study, 2, 4)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgdp.ablate: error: run folder")
    assert "config.train.steps: 3 there, 4 now" in err[0] and "another --out" in err[0]


@pytest.mark.parametrize("args,match", [
    (["--variants", "baseline,tgpd"], "unknown variant 'tgpd'.*did you mean 'tgdp'"),
    (["--variants", "tgdp,dual_random"], "--baseline 'baseline' is not among"),
    (["--seeds", "0"], "--seeds 0"),
    (["--train.batch_size", "64"], "batch_size=64 is larger than the 8 clips"),
    (["--masking.guide", "nope"], "config error: masking.guide='nope'"),
])
def test_user_errors_are_one_line(corpus, tmp_path, capsys, args, match):
    argv = _argv(corpus, tmp_path / "o") + args
    assert run("tgdp.ablate", ablate_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tgdp.ablate: error: ")
    assert __import__("re").search(match, err[0]), err[0]
    assert not (tmp_path / "o" / "runs").exists()          # nothing trained


def test_command_line_missing_data(tmp_path):
    p = subprocess.run([sys.executable, "-m", "tgdp.ablate", "--data", str(tmp_path / "none"), "--val-data",
                        str(tmp_path), "--steps", "1"], env=env(), cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("tgdp.ablate: error: --data ") and "manifest" in p.stderr


@pytest.mark.slow
def test_toy_study_with_torchrun(corpus, tmp_path):
    """--torchrun 2: each run is a 2-process gloo job; the evaluation happens in this process."""
    out = tmp_path / "tr"
    assert ablate_main(_argv(corpus, out, 1, 2, "--torchrun", "2")) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["settings"]["torchrun"] == 2
    for name in ("baseline", "tgdp"):
        assert summary["variants"][name]["seeds_done"] == [0]
        assert "torch.distributed.run" in (out / "runs" / name / "seed-0" / "train.log").read_text()
