"""Training data sources with a resumable position, and the CUDA prefetcher.

``data.root = "random"`` is a synthetic noise source for tests and benchmarks: global sample ``g``
is a deterministic random ``(audio [T, F], frames [3, S, S])`` pair drawn from a generator seeded by
``(train.seed, g)``, and step ``s`` of a run uses global samples ``s·B … s·B + B − 1`` with rank
``r`` taking rows ``r·b … r·b + b − 1`` (``b = B / world``). So a single-process run and a
distributed run with the same global batch see identical data, and the position is just the step.

Shard data goes through :func:`tgdp.data.loader.make_loader`; its position is ``(epoch, batches
consumed in the epoch)``. Its sample order depends only on (seed, epoch, rank, worker), so resuming
re-opens the epoch and skips the consumed batches to continue exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tgdp.configs import Config

__all__ = ["TrainBatch", "RandomSource", "LoaderSource", "CachedSource", "Prefetcher", "make_source", "RANDOM_ROOT"]

RANDOM_ROOT = "random"


@dataclass
class TrainBatch:
    """audio: [b, T, F] float32; frames: [b, 3, S, S] float32 (this rank's rows of the global batch)."""

    audio: torch.Tensor
    frames: torch.Tensor


def _sample_seed(seed: int, index: int) -> int:
    # splitmix-style mixing so neighbouring indices get unrelated streams
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


class RandomSource:
    """Deterministic noise batches indexed by step (see module doc)."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.local = cfg.train.batch_size // world_size
        self.step = 0
        self.skipped: dict = {}

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.model
        g = torch.Generator().manual_seed(_sample_seed(self.cfg.train.seed, index))
        audio = torch.randn(m.audio_length, m.n_mels, generator=g)
        frames = torch.randn(m.in_chans, m.img_size, m.img_size, generator=g)
        return audio, frames

    def next(self) -> TrainBatch:
        first = self.step * self.cfg.train.batch_size + self.rank * self.local
        pairs = [self.sample(first + j) for j in range(self.local)]
        self.step += 1
        return TrainBatch(torch.stack([a for a, _ in pairs]), torch.stack([f for _, f in pairs]))

    def state_dict(self) -> dict:
        return {"kind": "random", "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class LoaderSource:
    """Endless iteration over a ``make_loader`` train loader, epoch by epoch, with a resumable position."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, root: str | None = None):
        from tgdp.data.loader import make_loader

        self.loader = make_loader(cfg, "train", rank, world_size, root=root)
        self.epoch, self.consumed = 0, 0
        self._it = None

    @property
    def skipped(self) -> dict:
        return dict(getattr(self.loader, "skipped", {}))

    def _open(self) -> None:
        self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)

    def next(self) -> TrainBatch:
        if self._it is None:
            self._open()
            for _ in range(self.consumed):  # resume: replay the deterministic order up to the position
                next(self._it)
        for _ in range(2):
            try:
                b = next(self._it)
                break
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                self._open()
        else:
            raise RuntimeError("the training split yields no full batch; lower train.batch_size "
                               "or add data")
        self.consumed += 1
        return TrainBatch(b.audio, b.frames)

    def state_dict(self) -> dict:
        return {"kind": "loader", "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None


class CachedSource:
    """``data.cache_frames = K > 0``: the split is decoded once through the loader in retrieval mode
    (D1's exact preprocessing: fbank, windows, image transform), K evenly spaced frames per clip
    (with their audio windows) are kept in memory as fp16, and batches are drawn from the cache.

    Epoch ``e`` visits the clips in a permutation seeded by ``(seed, e)`` with one of the K frames
    per clip drawn from ``(seed, e)`` too; step ``s`` takes rows ``s·B … s·B + B − 1`` of that order
    (``B`` = global batch, drop-last) and rank ``r`` its ``b`` rows, so, as for the noise source, the
    position is just the step and DDP sees the single-process batch. For small sets (the demo):
    the per-sample fbank, which dominates the loader's cost on a CPU, is computed once per clip.
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, root: str | None = None):
        from tgdp.data.loader import make_loader

        d = cfg.data
        k = min(d.cache_frames, d.frames_per_clip)
        self.keep = [round(i * d.frames_per_clip / k) for i in range(k)]
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.batch, self.local = cfg.train.batch_size, cfg.train.batch_size // world_size
        loader = make_loader(cfg, "retrieval", 0, 1, root=root, batch_size=max(1, cfg.eval.batch_videos))
        audio, frames = [], []
        f = d.frames_per_clip
        for b in loader:
            n = len(b.ids)
            audio.append(b.audio.reshape(n, f, *b.audio.shape[1:])[:, self.keep].to(torch.float16))
            frames.append(b.frames.reshape(n, f, *b.frames.shape[1:])[:, self.keep].to(torch.float16))
        if not audio:
            raise RuntimeError(f"data.cache_frames: the split {root} yielded no clips")
        self.audio, self.frames = torch.cat(audio), torch.cat(frames)   # [N, K, T, F], [N, K, 3, S, S]
        self.skipped = dict(getattr(loader, "skipped", {}))
        self.n = self.audio.shape[0]
        self.per_epoch = self.n // self.batch
        if self.per_epoch < 1:
            raise RuntimeError(f"train.batch_size={self.batch} exceeds the {self.n} clips of {root}")
        self.step, self._epoch, self._order = 0, -1, None

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_sample_seed(self.cfg.train.seed, 1_000_003 + epoch))
            self._order = (torch.randperm(self.n, generator=g), torch.randint(len(self.keep), (self.n,), generator=g))
            self._epoch = epoch
        return self._order

    def next(self) -> TrainBatch:
        epoch, j = divmod(self.step, self.per_epoch)
        perm, frame = self._epoch_order(epoch)
        rows = perm[j * self.batch + self.rank * self.local: j * self.batch + (self.rank + 1) * self.local]
        self.step += 1
        return TrainBatch(self.audio[rows, frame[rows]].float(), self.frames[rows, frame[rows]].float())

    def state_dict(self) -> dict:
        return {"kind": "cached", "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_source(cfg: Config, rank: int = 0, world_size: int = 1, root: str | None = None):
    if cfg.data.root == RANDOM_ROOT:
        return RandomSource(cfg, rank, world_size)
    if cfg.data.cache_frames > 0:
        return CachedSource(cfg, rank, world_size, root=root)
    return LoaderSource(cfg, rank, world_size, root=root)


class Prefetcher:
    """Yields batches on ``device``; on CUDA the next batch is pinned and copied on a side stream while
    the current step runs (the main stream waits on an event, never the host). Elsewhere a plain move."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = source, device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._next: TrainBatch | None = None
        self._pos_before_next: dict | None = None  # source position not counting the prefetched batch

    def state_dict(self) -> dict:
        """Position of the batches handed out so far (the prefetched one is not consumed yet)."""
        return self._pos_before_next if self._next is not None else self.source.state_dict()

    def _fetch(self) -> TrainBatch:
        self._pos_before_next = self.source.state_dict()
        return self._copy(self.source.next())

    def _copy(self, b: TrainBatch) -> TrainBatch:
        with torch.cuda.stream(self._stream):
            return TrainBatch(b.audio.pin_memory().to(self.device, non_blocking=True),
                              b.frames.pin_memory().to(self.device, non_blocking=True))

    def next(self) -> TrainBatch:
        if not self.cuda:
            b = self.source.next()
            return TrainBatch(b.audio.to(self.device), b.frames.to(self.device))
        if self._next is None:
            self._next = self._fetch()
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        cur = self._next
        for t in (cur.audio, cur.frames):
            t.record_stream(torch.cuda.current_stream(self.device))  # keep memory alive for this stream
        self._next = self._fetch()
        return cur
