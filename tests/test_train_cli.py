"""python -m tgdp.train as a user meets it: explicit data, the announced demo folder, the start-up
header on rank 0, labelled stages and bar."""

import json
from pathlib import Path

import pytest

from _train_helpers import SMALL
from tgdp.configs import apply_overrides, tiny


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to generate or read data, or to start a run, fails the test."""
    def forbid(*a, **k):
        raise AssertionError("data was touched / the run started before the config error")
    import tgdp.data.synthetic
    import tgdp.training.distributed
    import tgdp.training.trainer
    monkeypatch.setattr(tgdp.data.synthetic, "ensure_demo", forbid)
    monkeypatch.setattr(tgdp.training.distributed, "init_distributed", forbid)
    monkeypatch.setattr(tgdp.training.trainer, "Trainer", forbid)


@pytest.mark.parametrize("argv", [["--preset", "paper"], ["--preset", "tiny", "--train.steps", "5"],
                                  ["--train.lr", "1e-4"]])
def test_no_data_root_stops_at_config_time_naming_both_ways(argv, no_data, capsys, tmp_path, monkeypatch):
    from tgdp.train import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.root is not set" in err
    assert "--data.root" in err and "--demo" in err
    assert not (tmp_path / "runs").exists()            # nothing written, no empty metrics files


def test_demo_announces_its_folder(monkeypatch, tmp_path, capsys):
    import tgdp.data.synthetic
    from tgdp.training.launch import resolve_data_root

    made = []
    monkeypatch.setattr(tgdp.data.synthetic, "ensure_demo", lambda d, **k: made.append(Path(d)))
    cfg = apply_overrides(tiny(), {"data.demo_dir": str(tmp_path / "demo")})
    root = resolve_data_root(cfg, is_main=True, demo=True)
    out = capsys.readouterr().out
    assert made == [tmp_path / "demo"] and root == str(tmp_path / "demo" / "train")
    assert f"demo set: generating it once in {tmp_path / 'demo'}" in out
    (tmp_path / "demo" / "stamp.json").parent.mkdir(parents=True)
    (tmp_path / "demo" / "stamp.json").write_text("{}")
    resolve_data_root(cfg, is_main=True, demo=True)
    assert f"demo set: {tmp_path / 'demo'} (data.demo_dir; made earlier, reused)" in capsys.readouterr().out


def test_explicit_root_wins_over_demo_and_random_needs_no_folder(tmp_path):
    from tgdp.training.launch import resolve_data_root

    cfg = apply_overrides(tiny(), {"data.root": str(tmp_path)})
    assert resolve_data_root(cfg, True, demo=True) == str(tmp_path)
    assert resolve_data_root(apply_overrides(tiny(), {"data.root": "random"}), True) is None


def test_start_up_header_stages_and_labelled_bar(tmp_path, capsys, one_thread):
    """A short noise-source run in process: the header names everything the issue lists, the
    parameter counts are the model's, and the progress bar is labelled."""
    import torch

    from tgdp.model import build_encoder
    from tgdp.train import main

    args = [*SMALL, "--train.steps", "2", "--train.out_dir", str(tmp_path / "run")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    header = out[:out.index("training:")]
    cfg = apply_overrides(tiny(), {SMALL[i][2:]: SMALL[i + 1] for i in range(2, len(SMALL), 2)})
    n = sum(p.numel() for p in build_encoder(cfg.model, "auto", torch.device("cpu")).parameters())
    expect = ["preset       tiny", "config file none", "overrides --data.root random",
              f"data         noise source", f"out_dir      {(tmp_path / 'run').resolve()}",
              "device       cpu, world size 1", "loader       noise source", "ops          plain-torch reference",
              "compile      torch.compile off, CUDA graphs off", "model        FastCAVMAESync",
              f"parameters   student {n / 1e6:.2f} M ({n / 1e6:.2f} M trainable); EMA teacher {n / 1e6:.2f} M",
              "attention    sdpa", "plan         2 steps x global batch 4",
              "building the model, the EMA teacher and the optimizer ...", "set up in "]
    for text in expect:
        assert text in header, text
    assert "train: 100%" in err                          # the training bar carries its label
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_header_describes_shard_data_and_caching(tmp_path):
    from test_loader import write_dataset

    from tgdp.training.header import Origin, run_lines
    from tgdp.training.launch import _setup_text, check_data

    write_dataset(tmp_path / "shards", [3, 2], img=32)
    cfg = apply_overrides(tiny(), {"data.root": str(tmp_path / "shards"), "train.batch_size": 4,
                                   "data.loader": "torch"})
    import torch
    data = check_data(cfg, cfg.data.root)
    lines = run_lines(cfg, Origin("tiny", "run.toml", ("--train.lr", "1e-4")), data, torch.device("cpu"), 1)
    assert f"data         {(tmp_path / 'shards').resolve()}: 5 clips in 2 shards (0 skipped by prepare)" in lines
    assert lines[0] == "preset       tiny; config file run.toml; overrides --train.lr 1e-4"
    assert "decoded once into a memory cache of 4 frames per clip" in lines[4]
    assert "decoding the 5 training clips once into memory (4 of 16 frames each" in _setup_text(cfg, data)


def test_second_main_job_writes_next_to_the_first_never_into_it(monkeypatch, tmp_path, capsys):
    """`python -m tgdp.train` twice: the second run must neither be refused nor touch the first."""
    import tgdp.training.demo
    from tgdp import train as train_cli

    seen = []
    monkeypatch.setattr(tgdp.training.demo, "run_demo", lambda cfg, **k: seen.append(cfg.train.out_dir))
    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["--demo"]) == 0
    assert seen == ["runs/tiny"]                      # free: the preset's folder
    first = tmp_path / "runs" / "tiny"
    (first / "checkpoints").mkdir(parents=True)
    (first / "checkpoints" / "step-00000010.pt").write_bytes(b"x")
    (tmp_path / "runs" / "tiny-2").mkdir()
    (tmp_path / "runs" / "tiny-2" / "summary.json").write_text("{}")
    assert train_cli.main(["--demo"]) == 0
    assert seen[-1] == str(tmp_path / "runs" / "tiny-3").replace(str(tmp_path) + "/", "")
    assert "runs/tiny holds an earlier run; this run writes to runs/tiny-3" in capsys.readouterr().out
    # a folder the user chose, resume and overwrite are claimed as asked (refusal is the trainer's)
    for extra in (["--train.out_dir", "runs/tiny"], ["--train.resume", "true"], ["--train.overwrite", "true"]):
        assert train_cli.main(["--demo", *extra]) == 0
        assert seen[-1] == "runs/tiny"
