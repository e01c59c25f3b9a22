"""Atomic checkpoints: keep-last-N, the latest pointer, crashes mid-write, SIGKILL during saves, RNG state."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from tgdp.training import checkpoint as ck
from tgdp import atomic
from tgdp.atomic import atomic_torch_save
from tgdp.training.checkpoint import CheckpointManager


def _state(step: int, n: int = 16) -> dict:
    return {"model": {"w": torch.full((n,), float(step))}, "teacher": {}, "optimizer": {}, "scheduler": {},
            "step": step, "data": {}, "config": {}}


def test_save_load_keep_last_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, run_id="r1")
    assert mgr.latest() is None
    for s in (1, 2, 3):
        mgr.save(_state(s), s)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000002.pt", "step-00000003.pt"]
    assert (tmp_path / "latest").read_text().split()[:2] == ["step-00000003.pt", "run=r1"]
    assert CheckpointManager.load(mgr.latest())["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_latest_falls_back_to_newest_file(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5, run_id="r1")
    mgr.save(_state(4), 4)
    (tmp_path / "latest").unlink()
    assert mgr.latest().name == "step-00000004.pt"


def test_crash_during_write_leaves_old_state(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3, run_id="r1")
    mgr.save(_state(1), 1)

    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="simulated") as err:
        mgr.save(_state(2), 2)
    monkeypatch.undo()
    assert err.value.filename == str(tmp_path / "step-00000002.pt")         # names the file, not the temporary
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001.pt"]
    assert mgr.latest().name == "step-00000001.pt"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]   # the failed write cleaned up
    # a writer killed before its rename (no cleanup ran) leaves a temporary: removed when a manager opens
    (tmp_path / ".tmp-step-00000002.pt.999.tmp").write_bytes(b"torn")
    mgr2 = CheckpointManager(tmp_path, keep_last=3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert CheckpointManager.load(mgr2.latest())["step"] == 1


def test_load_rejects_foreign_file(tmp_path):
    atomic_torch_save({"model": {}, "config": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="'teacher'"):
        CheckpointManager.load(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_rng_state_roundtrip():
    st = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


_WRITER = textwrap.dedent("""
    import sys, torch
    from tgdp.training.checkpoint import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], keep_last=2, run_id="r1")
    step = 0
    while True:
        step += 1
        # ~8 MB per file so that a kill often lands inside a write
        mgr.save({"model": {"w": torch.full((2_000_000,), float(step))}, "teacher": {}, "optimizer": {},
                  "scheduler": {}, "step": step, "data": {}, "config": {}}, step)
        print(step, flush=True)
""")


def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    rng = random.Random(0)
    for trial in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline()          # at least one save completed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mgr = CheckpointManager(tmp_path, keep_last=2, clean=False)
        ckpts = mgr.checkpoints()
        assert ckpts
        for p in ckpts:                        # every visible checkpoint is complete and consistent
            st = CheckpointManager.load(p)
            assert st["step"] == int(p.stem.split("-")[1])
            assert torch.all(st["model"]["w"] == float(st["step"]))
        assert CheckpointManager.load(mgr.latest())["step"] >= 1
