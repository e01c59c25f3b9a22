"""SIGKILL mid-run, then --train.resume true: the following losses equal an uninterrupted run bit for bit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_helpers import REPO, SMALL, env, losses, run_train
from tgdp.training.checkpoint import CheckpointManager

STEPS = 10


def _kill_after(args: list[str], out: Path, rows: int, nproc: int = 1) -> None:
    """Start a run, SIGKILL its whole process group once ``rows`` metric rows are logged."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.Popen([*launcher, "-m", "tgdp.train", *args], env=env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if log.is_file() and sum(1 for line in open(log) if line.strip()) >= rows:
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the kill: {proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        else:
            raise AssertionError("run too slow: no kill point reached")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode != 0   # it really was killed mid-run


def _check_ckpt_dir(out: Path) -> None:
    d = out / "checkpoints"
    assert not [p.name for p in d.iterdir() if p.name.startswith(".tmp-")]
    for p in CheckpointManager(d, clean=False).checkpoints():
        CheckpointManager.load(p)


def test_sigkill_then_resume_is_bitwise_exact(tmp_path):
    args = [*SMALL, "--train.steps", str(STEPS), "--train.ckpt_every", "2", "--train.keep_last", "2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_train([*args, "--train.out_dir", str(ref_dir)])
    _kill_after([*args, "--train.out_dir", str(run_dir)], run_dir, rows=5)
    killed_at = max(losses(run_dir))
    assert killed_at < STEPS
    p = run_train([*args, "--train.out_dir", str(run_dir), "--train.resume", "true"])
    assert "resumed from step-" in p.stdout + p.stderr
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for key in ("loss", "loss_rec", "loss_con", "loss_dis", "acc"):
        ref_k, got_k = losses(ref_dir, key), losses(run_dir, key)
        assert all(got_k[s] == ref_k[s] for s in ref_k), key      # bit for bit
    _check_ckpt_dir(run_dir)
    a = CheckpointManager.load(ref_dir / "checkpoints" / "step-00000010.pt")
    b = CheckpointManager.load(run_dir / "checkpoints" / "step-00000010.pt")
    for part in ("model", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert ref[STEPS] == got[STEPS]


def test_kill_during_saves_leaves_only_complete_checkpoints(tmp_path):
    # a checkpoint every step: a kill at a random time often lands inside a save
    args = [*SMALL, "--train.steps", "8", "--train.ckpt_every", "1", "--train.keep_last", "3",
            "--train.out_dir", str(tmp_path)]
    _kill_after(args, tmp_path, rows=3)
    ckpts = CheckpointManager(tmp_path / "checkpoints", clean=False).checkpoints()
    assert ckpts
    for p in ckpts:
        st = CheckpointManager.load(p)
        assert st["step"] == int(p.stem.split("-")[1])
    run_train([*args, "--train.resume", "true"])
    _check_ckpt_dir(tmp_path)
    assert sorted(losses(tmp_path)) == list(range(1, 9))


@pytest.mark.dist
def test_fsdp2_resume_matches_uninterrupted(tmp_path):
    args = [*SMALL, "--train.steps", "6", "--train.ckpt_every", "2", "--train.dist", "fsdp2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_train([*args, "--train.out_dir", str(ref_dir)], nproc=2)
    _kill_after([*args, "--train.out_dir", str(run_dir)], run_dir, rows=3, nproc=2)
    run_train([*args, "--train.out_dir", str(run_dir), "--train.resume", "true"], nproc=2)
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_resume_exact_on_streamed_shards(tmp_path):
    """data.cache_frames 0 (the shard loader): resuming replays the epoch order up to the saved
    position, so steps after the checkpoint equal the uninterrupted run bit for bit."""
    from tgdp.configs import tiny
    from tgdp.data.synthetic import ensure_demo

    root = str(ensure_demo(tiny().data.demo_dir) / "train")   # a run names its data (or says --demo)
    args = ["--preset", "tiny", "--data.root", root, "--data.cache_frames", "0", "--train.batch_size", "8",
            "--train.steps", "6",
            "--train.log_every", "1", "--train.ckpt_every", "3", "--train.keep_last", "5"]
    ref = tmp_path / "ref"
    run_train([*args, "--train.out_dir", str(ref)], timeout=1800)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    src = ref / "checkpoints" / "step-00000003.pt"
    (run / "checkpoints" / src.name).write_bytes(src.read_bytes())   # as if killed after step 3
    run_train([*args, "--train.out_dir", str(run), "--train.resume", "true"], timeout=1800)
    a, b = losses(ref), losses(run)
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)
