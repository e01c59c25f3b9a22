"""Training batches on the device before the step that needs them, without holding up the host.

:class:`Prefetcher` wraps a training source (:mod:`tgdp.training.sources`). On a CUDA device:

- a background thread (``tgdp-prefetch``) runs the source ``depth`` batches ahead, so decoding,
  host-side masks and DALI batch assembly overlap the training step on the main thread;
- host (CPU) tensors are copied into **reusable** page-locked buffers (:class:`PinnedRing`, two sets
  allocated once per shape) and uploaded from there asynchronously; the main thread never pins a
  fresh batch (the paper batch is ~209 MB of fp32 per step);
- tensors already on a device (DALI's ``"mixed"`` decoder output) are taken as they are and never
  pinned (pinning a CUDA tensor raises);
- all of it runs on a side stream; the compute stream waits on an event recorded after the batch's
  copies (a device-side wait, the host does not block), and ``record_stream`` keeps the memory of
  the handed-out tensors alive for it.

Elsewhere (CPU, or ``meta`` in tests) the batch is moved synchronously on the calling thread.
``background`` and ``pin`` override the CUDA defaults (tests use them with meta tensors).
``state_dict()`` is the source position of the batches *handed out*, whatever the thread has
fetched ahead, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import queue
import threading
import weakref

import torch

from tgdp.masking import Masks
from tgdp.training.sources import TrainBatch

__all__ = ["Prefetcher", "PinnedRing"]


def _empty_pinned(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class PinnedRing:
    """``slots`` sets of page-locked staging buffers, one per (name, shape, dtype), allocated on first
    use and reused. A set is rewritten only after the upload that last read it has finished
    (:meth:`acquire` waits for the event given to :meth:`release`; on the prefetch thread)."""

    def __init__(self, slots: int = 2, pin: bool = True):
        self.pin = pin
        self.sets: list[dict] = [{} for _ in range(slots)]
        self.events: list = [None] * slots
        self.turn = 0
        self.allocations = 0

    def acquire(self) -> int:
        """The next set, once its previous upload is done."""
        slot, self.turn = self.turn, (self.turn + 1) % len(self.sets)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
            self.events[slot] = None
        return slot

    def stage(self, slot: int, name: str, t: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of host tensor ``t`` in set ``slot`` (valid until the set is reused)."""
        key = (name, tuple(t.shape), t.dtype)
        bufs = self.sets[slot]
        buf = bufs.get(key)
        if buf is None:
            for old in [k for k in bufs if k[0] == name]:   # a new shape replaces the old one
                del bufs[old]
            buf = bufs[key] = _empty_pinned(t.shape, t.dtype, self.pin)
            self.allocations += 1
        buf.copy_(t)
        return buf

    def release(self, slot: int, event) -> None:
        self.events[slot] = event


_STOP = object()


class Prefetcher:
    """Batches of ``source`` on ``device`` (see the module doc). ``next()`` -> :class:`TrainBatch`."""

    def __init__(self, source, device: torch.device | str, *, depth: int = 2, background: bool | None = None,
                 pin: bool | None = None):
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.source, self.device, self.depth = source, torch.device(device), depth
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.background = self.cuda if background is None else background
        # Pinned staging only makes sense for a copy to another device (on the CPU it would alias).
        self.pin = (self.cuda if pin is None else pin) and self.device.type != "cpu"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ring = PinnedRing(2, pin=self.cuda) if self.pin else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._positions: collections.deque = collections.deque()   # source position before each fetch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict:
        """Position of the batches handed out so far (fetched-ahead batches are not consumed)."""
        with self._lock:   # the thread records a position before it advances the source
            return self._positions[0] if self._positions else self.source.state_dict()

    # ------------------------------------------------------------------ staging

    def _upload(self, t: torch.Tensor, name: str, slot: int | None) -> torch.Tensor:
        if t.device.type != "cpu":       # already on a device (DALI "mixed"): never pinned
            return t.to(self.device, non_blocking=True)
        if slot is not None:
            t = self._ring.stage(slot, name, t)
        return t.to(self.device, non_blocking=slot is not None)

    def _copy(self, b: TrainBatch) -> TrainBatch:
        """``b`` on the device: host tensors through the pinned ring, device tensors as they are; on
        CUDA the returned batch carries ``ready``, the event its consumer waits on."""
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            host = self._ring is not None and any(t.device.type == "cpu" for t in (b.audio, b.frames))
            slot = self._ring.acquire() if host else None
            out = TrainBatch(self._upload(b.audio, "audio", slot), self._upload(b.frames, "frames", slot),
                             _masks_to(b.masks_rec, self.device, non_blocking=True))
            if self._stream is not None:
                out.ready = torch.cuda.Event()
                out.ready.record(self._stream)
                if b.masks_event is not None:
                    b.masks_event.record(self._stream)   # the host mask slot may be rewritten after this
            if slot is not None:
                self._ring.release(slot, out.ready)
        return out

    # ------------------------------------------------------------------ background thread

    def _work(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
            with ctx:   # the source's own device work (DALI batch assembly) goes on the side stream too
                while not self._stop.is_set():
                    with self._lock:
                        self._positions.append(self.source.state_dict())
                    if not self._put(self._copy(self.source.next())):
                        return
        except BaseException as exc:   # handed to the main thread, raised by next()
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tgdp-prefetch", daemon=True)
        self._thread.start()
        # stopped before the interpreter tears down (a daemon thread killed inside DALI or CUDA
        # calls can crash the exit); a weak reference, so a finished Prefetcher is still collected
        atexit.register(_close_if_alive, weakref.ref(self))

    def close(self) -> None:
        """Stop the background thread (batches fetched ahead are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ consumer

    def next(self) -> TrainBatch:
        if not self.background:
            b = self._copy(self.source.next())
        else:
            if self._error is not None:
                raise self._error
            if self._thread is None:
                self._start()
            item = self._queue.get()
            with self._lock:
                self._positions.popleft()
            if isinstance(item, BaseException):
                self._error = item
                raise item
            b = item
        if b.ready is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(b.ready)       # device-side wait: the host goes on
            extra = [t for m in (b.masks_rec or ()) for t in (m.ids_keep, m.ids_restore, m.mask)]
            for t in (b.audio, b.frames, *extra):
                if t.is_cuda:
                    t.record_stream(cur)  # allocated on the side stream, used on this one
        return b


def _close_if_alive(ref) -> None:
    p = ref()
    if p is not None:
        p.close()


def _masks_to(pair: tuple[Masks, Masks] | None, device: torch.device, non_blocking: bool = False):
    if pair is None:
        return None
    return tuple(Masks(m.ids_keep.to(device, non_blocking=non_blocking),
                       m.ids_restore.to(device, non_blocking=non_blocking),
                       m.mask.to(device, non_blocking=non_blocking)) for m in pair)
