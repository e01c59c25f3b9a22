"""tgdp.training.prefetch: device batches are never pinned, host batches are staged in reused buffers
off the main thread, and the background prefetch keeps order, position and errors (issue 10: 1, 10, g).

Meta tensors stand in for device (CUDA) tensors: they have a device and no data, so any pin, host
read or copy back of them fails loudly on this CPU box.
"""

import threading
import time

import pytest
import torch

from _train_helpers import SMALL_DICT
from tgdp.configs import apply_overrides, tiny
from tgdp.training import prefetch
from tgdp.training.prefetch import PinnedRing, Prefetcher
from tgdp.training.sources import RandomSource, TrainBatch

CFG = apply_overrides(tiny(), {**SMALL_DICT, "train.steps": 4}).validate()


def _forbid_pin(monkeypatch):
    def pin(self, *a, **k):
        raise AssertionError(f"pin_memory() called on a {self.device} tensor of shape {tuple(self.shape)}")
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)


class DeviceSource:
    """Batches already on the device, as DALI's "mixed" decoder hands them over."""

    def __init__(self):
        self.step = 0

    def next(self) -> TrainBatch:
        self.step += 1
        return TrainBatch(torch.empty(2, 64, 128, device="meta"), torch.empty(2, 3, 32, 32, device="meta"))

    def state_dict(self) -> dict:
        return {"step": self.step}


def test_device_batches_are_never_pinned(monkeypatch):
    _forbid_pin(monkeypatch)
    p = Prefetcher(DeviceSource(), "meta")
    p.pin = True                                   # as on a CUDA device
    b = p._copy(p.source.next())                   # the staging step of the CUDA path
    assert b.audio.device.type == b.frames.device.type == "meta"
    q = Prefetcher(DeviceSource(), "meta", background=True, pin=True)
    try:
        got = [q.next() for _ in range(3)]
    finally:
        q.close()
    assert all(x.audio.device.type == "meta" and x.audio.shape == (2, 64, 128) for x in got)


def test_host_batches_use_two_reused_staging_sets_filled_off_the_main_thread(monkeypatch):
    """No fresh pin of the batch per step: 2 sets x (audio, frames) buffers are allocated once, and
    every staging copy runs on the prefetch thread."""
    _forbid_pin(monkeypatch)
    allocs, copies = [], []

    def alloc(shape, dtype, pin):
        allocs.append((tuple(shape), threading.current_thread().name))
        return torch.empty(shape, dtype=dtype)     # a CPU build cannot page-lock
    monkeypatch.setattr(prefetch, "_empty_pinned", alloc)
    stage = PinnedRing.stage

    def spy(self, slot, name, t):
        copies.append(threading.current_thread().name)
        return stage(self, slot, name, t)
    monkeypatch.setattr(PinnedRing, "stage", spy)
    p = Prefetcher(RandomSource(CFG), "meta", background=True, pin=True)
    try:
        for _ in range(6):
            b = p.next()
            assert b.audio.device.type == "meta" and b.audio.shape == (4, 64, 128)
    finally:
        p.close()
    assert len(allocs) == 4 and {t for _, t in allocs} == {"tgdp-prefetch"}
    assert len(copies) >= 12 and set(copies) == {"tgdp-prefetch"}


class Event:
    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


def test_pinned_ring_reuses_a_set_after_its_upload():
    ring = PinnedRing(2, pin=False)
    x, y, z = (torch.full((3, 4), v) for v in (1.0, 2.0, 3.0))
    e0, e1 = Event(), Event()
    s0 = ring.acquire()
    b0 = ring.stage(s0, "audio", x)
    ring.release(s0, e0)
    s1 = ring.acquire()
    b1 = ring.stage(s1, "audio", y)
    ring.release(s1, e1)
    assert s0 != s1 and b0 is not b1 and torch.equal(b0, x) and torch.equal(b1, y)
    s2 = ring.acquire()                      # set 0 again: waits for its upload first
    assert s2 == s0 and e0.waits == 1 and e1.waits == 0
    b2 = ring.stage(s2, "audio", z)
    assert b2 is b0 and torch.equal(b0, z) and torch.equal(b1, y) and ring.allocations == 2
    ring.stage(s2, "audio", torch.zeros(5, 4))    # a new shape replaces the old buffer of that name
    assert ring.allocations == 3 and len(ring.sets[s2]) == 1


def test_background_prefetch_keeps_order_and_hands_out_the_consumed_position():
    src, ref = RandomSource(CFG), RandomSource(CFG)
    p = Prefetcher(src, "cpu", background=True)
    try:
        for k in range(4):
            b, r = p.next(), ref.next()
            assert torch.equal(b.audio, r.audio) and torch.equal(b.frames, r.frames)
            deadline = time.time() + 30
            while not p._queue.full() and time.time() < deadline:   # let the thread run ahead
                time.sleep(0.01)
            assert src.step > k + 1                                   # it did fetch ahead ...
            assert p.state_dict() == {"kind": "random", "step": k + 1}   # ... the checkpoint does not
    finally:
        p.close()


class Failing:
    def __init__(self):
        self.step = 0

    def next(self):
        self.step += 1
        if self.step == 3:
            raise RuntimeError("the training split yields no full batch")
        return TrainBatch(torch.zeros(1, 2), torch.zeros(1, 3))

    def state_dict(self):
        return {"step": self.step}


def test_a_source_error_reaches_the_training_loop():
    p = Prefetcher(Failing(), "cpu", background=True)
    try:
        p.next(), p.next()
        for _ in range(2):
            with pytest.raises(RuntimeError, match="no full batch"):
                p.next()
    finally:
        p.close()


def test_cpu_default_is_synchronous_and_unpinned():
    p = Prefetcher(RandomSource(CFG), "cpu")
    assert (p.background, p.pin, p._thread) == (False, False, None)
    b = p.next()
    assert b.audio.device.type == "cpu" and p.state_dict() == {"kind": "random", "step": 1}
    with pytest.raises(ValueError, match="depth=0"):
        Prefetcher(RandomSource(CFG), "cpu", depth=0)


def test_the_trainer_stops_its_prefetch_thread_when_the_run_ends(tmp_path):
    """Trainer.run closes its Prefetcher: the background thread (the default on CUDA) does not
    outlive the run, blocked on a full queue and holding the source's workers."""
    from tgdp.configs import apply_overrides, tiny
    from tgdp.training.distributed import DistInfo
    from tgdp.training.trainer import Trainer

    cfg = apply_overrides(tiny(), {"data.root": "random", "train.batch_size": 2, "train.steps": 2,
                                   "train.out_dir": str(tmp_path)}).validate()
    tr = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), progress=False)
    tr.source = Prefetcher(tr.source.source, "cpu", background=True, depth=1)
    tr.run()
    assert tr.source._thread is not None and not tr.source._thread.is_alive()
