"""The training step and loop in one process: config errors before data, the non-finite skip, the EMA
teacher, the optimizer recipe, no host syncs in the step, outputs of a run, capability fallbacks."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from _train_helpers import SMALL_DICT, losses, run_train
from tgdp.configs import apply_overrides, tiny
from tgdp.training.distributed import DistInfo
from tgdp.training.loop import METRICS, draw_rec_masks, train_step
from tgdp.training.trainer import Trainer
from tgdp.training.sources import RandomSource

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def small_cfg(tmp_path, **over):
    return apply_overrides(tiny(), {**SMALL_DICT, "train.steps": 4, "train.out_dir": str(tmp_path), **over}).validate()


# ----------------------------------------------------------------------------- config errors

@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to read data or start a process group fails the test."""
    def forbid(*a, **k):
        raise AssertionError("data was read / the run started before the config error")
    import tgdp.data.loader
    import tgdp.training.distributed
    import tgdp.training.sources
    monkeypatch.setattr(tgdp.training.sources, "make_source", forbid)
    monkeypatch.setattr(tgdp.data.loader, "make_loader", forbid)
    monkeypatch.setattr(tgdp.training.distributed, "init_distributed", forbid)


@pytest.mark.parametrize("args,field", [
    (["--train.nope", "1"], "train.nope"),
    (["--masking.rec_ratio", "1.0"], "masking.rec_ratio"),
    (["--masking.con_ratio", "-0.1"], "masking.con_ratio"),
    (["--train.steps", "0", "--data.root", "random"], "train.steps"),
])
def test_bad_config_fails_before_data(no_data, capsys, args, field):
    from tgdp.train import main
    assert main(["--preset", "tiny", "--data.root", "/nonexistent/shards", *args]) == 2
    assert field in capsys.readouterr().err


def test_batch_not_divisible_by_world_fails_before_data(no_data, capsys, monkeypatch):
    from tgdp.train import main
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--preset", "tiny", "--data.root", "/nonexistent/shards", "--train.batch_size", "4"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size=4" in err and "3" in err


# ----------------------------------------------------------------------------- data / masks split by rank

def test_random_source_and_masks_split_by_rank():
    cfg = apply_overrides(tiny(), {**SMALL_DICT, "train.steps": 2, "train.batch_size": 4})
    one, halves = RandomSource(cfg), [RandomSource(cfg, r, 2) for r in range(2)]
    for _ in range(2):
        full, parts = one.next(), [h.next() for h in halves]
        assert torch.equal(full.audio, torch.cat([p.audio for p in parts]))
        assert torch.equal(full.frames, torch.cat([p.frames for p in parts]))
    m1 = draw_rec_masks(cfg, 5, CPU)
    m2 = [draw_rec_masks(cfg, 5, DistInfo(r, 2, r, torch.device("cpu"))) for r in range(2)]
    for mod in range(2):
        assert torch.equal(m1[mod].ids_keep, torch.cat([m[mod].ids_keep for m in m2]))
        assert torch.equal(m1[mod].mask, torch.cat([m[mod].mask for m in m2]))
    assert not torch.equal(draw_rec_masks(cfg, 6, CPU)[0].ids_keep, m1[0].ids_keep)


# ----------------------------------------------------------------------------- the step

def _snapshot(tr):
    st = tr.method.student.state_dict()
    te = tr.method.teacher.module.state_dict()
    opt = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in tr.optimizer.state_dict()["state"].items()}
    return {k: v.clone() for k, v in st.items()}, {k: v.clone() for k, v in te.items()}, opt


def test_optimizer_recipe(tmp_path):
    tr = Trainer(small_cfg(tmp_path), CPU, progress=False)
    g = tr.optimizer.param_groups[0]
    assert isinstance(tr.optimizer, torch.optim.AdamW) and g["fused"]
    assert g["betas"] == (0.95, 0.999) and g["weight_decay"] == 5e-7
    params = {id(p) for p in g["params"]}
    student = tr.method.student
    assert params == {id(p) for p in student.parameters() if p.requires_grad}
    assert all(id(b) not in params for b in student.buffers())
    assert "pos_embed_a" in dict(student.named_buffers())
    assert not any(p.requires_grad for p in tr.method.teacher.parameters())


def test_nonfinite_step_is_skipped_on_device(tmp_path):
    tr = Trainer(small_cfg(tmp_path), CPU, progress=False)
    s = tr.state
    real = s.forward

    def nan_forward(*a, **k):
        out = real(*a, **k)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    batch = tr.source.next()
    train_step(s, batch, 0)                       # one real step so the optimizer has state
    before = _snapshot(tr)
    s.forward = nan_forward
    train_step(s, batch, 1)
    after = _snapshot(tr)
    for b, a in zip(before[:2], after[:2]):
        assert all(torch.equal(b[k], a[k]) for k in b)           # student and teacher untouched
    for k in before[2]:
        assert all(torch.equal(before[2][k][kk], after[2][k][kk]) for kk in before[2][k])  # moments, step
    assert s.skipped_total.item() == 1
    assert s.sums[len(METRICS) + 1].item() == 1 and s.sums[len(METRICS)].item() == 1
    assert torch.isfinite(s.sums).all()          # the NaN step does not poison the averages
    s.forward = real
    train_step(s, batch, 2)
    assert not torch.equal(before[0]["decoder_pred_a.weight"], tr.method.student.state_dict()["decoder_pred_a.weight"])


def test_ema_teacher_update_after_optimizer_step(tmp_path):
    tr = Trainer(small_cfg(tmp_path, **{"teacher.momentum": 0.9}), CPU, progress=False)
    t0 = {k: v.clone() for k, v in tr.method.teacher.module.named_parameters()}
    train_step(tr.state, tr.source.next(), 0)
    s1 = dict(tr.method.student.named_parameters())
    for k, t in tr.method.teacher.module.named_parameters():
        expect = 0.9 * t0[k] + 0.1 * s1[k].detach()
        torch.testing.assert_close(t, expect, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_step(tmp_path):
    tr = Trainer(small_cfg(tmp_path, **{"train.precision": "bf16"}), CPU, progress=False)
    assert tr.state.autocast_dtype is torch.bfloat16
    before = tr.method.student.decoder_pred_a.weight.detach().clone()
    train_step(tr.state, tr.source.next(), 0)
    assert tr.method.student.decoder_pred_a.weight.dtype is torch.float32      # fp32 master weights
    assert not torch.equal(before, tr.method.student.decoder_pred_a.weight)
    assert tr.state.skipped_total.item() == 0 and torch.isfinite(tr.state.sums).all()
    assert Trainer(small_cfg(tmp_path / "b"), CPU, progress=False).state.autocast_dtype is None  # auto on CPU


def test_init_from_checkpoint(tmp_path):
    a = Trainer(small_cfg(tmp_path / "a"), CPU, progress=False)
    train_step(a.state, a.source.next(), 0)
    a.step = 1
    a.save()
    path = a.ckpt.latest()
    b = Trainer(small_cfg(tmp_path / "b", **{"train.init": str(path)}), CPU, progress=False)
    sa = a.method.student.state_dict()
    for k, v in b.method.student.state_dict().items():
        assert torch.equal(v, sa[k])
    for k, v in b.method.teacher.module.state_dict().items():
        assert torch.equal(v, sa[k])


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_train_step_has_no_host_sync(tmp_path, monkeypatch, clip):
    tr = Trainer(small_cfg(tmp_path, **{"train.grad_clip": clip}), CPU, progress=False)
    batch = tr.source.next()

    def sync(*a, **k):
        raise AssertionError("host sync in train_step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    train_step(tr.state, batch, 0)
    monkeypatch.undo()
    assert tr.state.sums[len(METRICS)].item() == 1


# ----------------------------------------------------------------------------- a whole run

def test_run_writes_logs_summary_plot_and_skips_gpu_paths(tmp_path):
    p = run_train(["--preset", "tiny", *sum(([f"--{k}", v] for k, v in SMALL_DICT.items()), []),
                   "--train.steps", "4", "--train.log_every", "2", "--train.ckpt_every", "2",
                   "--train.cuda_graphs", "true", "--train.out_dir", str(tmp_path)])
    assert "train.cuda_graphs skipped: no CUDA device" in p.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    for key in (*METRICS, "lr", "samples_per_s", "nonfinite_steps", "tflops_per_s"):
        assert key in rows[-1] and math.isfinite(rows[-1][key])
    assert "mfu" not in rows[-1]                     # no peak FLOP/s is known for a CPU
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 0 and summary["flops_per_sample"] > 0
    assert Path(summary["checkpoint"]).name == "step-00000004.pt"
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(summary["checkpoint"], weights_only=True)
    assert ck["config"]["train"]["steps"] == 4 and ck["data"] == {"kind": "random", "step": 4}
    assert ck["scheduler"]["step_num"] == 4


@pytest.mark.slow
def test_compile_on_cpu_matches_eager(tmp_path):
    args = [*sum(([f"--{k}", v] for k, v in SMALL_DICT.items()), ["--preset", "tiny"]), "--train.steps", "2"]
    run_train([*args, "--train.compile", "true", "--train.out_dir", str(tmp_path / "c")], timeout=900)
    run_train([*args, "--train.out_dir", str(tmp_path / "e")])
    got, ref = losses(tmp_path / "c"), losses(tmp_path / "e")
    assert sorted(got) == [1, 2]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    """The README's main command (no arguments) on the cached demo set; ~15 min on 2 cores."""
    import os
    import subprocess
    import sys

    from _train_helpers import env
    p = subprocess.run([sys.executable, "-m", "tgdp.train"], env=env(), cwd=tmp_path, capture_output=True,
                       text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert rep["retrieval"]["v2a"]["R@1"] > 3 * rep["chance"]["R@1"]
    assert os.path.isfile(rep["plots"]["tsne"]) and os.path.isfile(rep["plots"]["loss_curves"])
    assert (tmp_path / "runs" / "tiny" / "report.md").read_text().count("|") > 20
    # The attention probe on the trained checkpoint beats chance (10 classes) on the held-out split.
    from tgdp.configs import tiny
    demo = Path(tiny().data.demo_dir).expanduser()
    ckpt = sorted((tmp_path / "runs" / "tiny" / "checkpoints").glob("step-*.pt"))[-1]
    p = subprocess.run([sys.executable, "-m", "tgdp.eval", "probe", "--ckpt", str(ckpt), "--data",
                        str(demo / "train"), "--eval-data", str(demo / "val"), "--out", str(tmp_path / "probe"),
                        "--epochs", "5"], env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe["metric"] == "top1" and probe["result"] > 0.5, probe["result"]
