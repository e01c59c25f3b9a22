"""Training data sources with a resumable position (moved to the device by :mod:`tgdp.training.prefetch`).

``data.root = "random"`` is a synthetic noise source for tests and benchmarks: global sample ``g``
is a deterministic random ``(audio [T, F], frames [3, S, S])`` pair drawn from a generator seeded by
``(train.seed, g)``, and step ``s`` of a run uses global samples ``s·B … s·B + B − 1`` with rank
``r`` taking rows ``r·b … r·b + b − 1`` (``b = B / world``). So a single-process run and a
distributed run with the same global batch see identical data, and the position is just the step.

Shard data goes through :func:`tgdp.data.loader.make_loader`; its position is ``(epoch, batches
consumed in the epoch)``. Its sample order depends only on (seed, epoch, rank, worker), so resuming
re-opens the epoch and skips the consumed batches to continue exactly.

``data.host_masks``: every source also hands out the reconstruction masks of its batch, drawn on
the host by :class:`HostMasks` (see there) from (train.seed, step, global sample index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgdp.configs import Config
from tgdp.masking import Masks

__all__ = ["TrainBatch", "HostMasks", "host_rec_masks", "RandomSource", "LoaderSource", "CachedSource", "make_source",
           "RANDOM_ROOT"]

RANDOM_ROOT = "random"


@dataclass
class TrainBatch:
    """audio: [b, T, F] float32; frames: [b, 3, S, S] float32 (this rank's rows of the global batch).

    masks_rec: (audio, video) reconstruction :class:`Masks` of these rows (``data.host_masks``), else
    None; ``masks_event``: CUDA event the prefetcher records after copying them (frees the host slot);
    ``ready``: CUDA event recorded after the prefetcher's copies of this batch (the step waits on it).
    """

    audio: torch.Tensor
    frames: torch.Tensor
    masks_rec: tuple[Masks, Masks] | None = None
    masks_event: object = None
    ready: object = None


class HostMasks:
    """Reconstruction masks of this rank's rows, packed on the host by :func:`tgdp.pack.pack`.

    ``__call__(step, audio_valid)``: audio_valid ``[b]`` int = valid time columns of each audio
    window (a prefix, :func:`tgdp.data.loader.valid_time_columns`); returns host ``(audio, video)``
    Masks with ``ids_keep [b, k]`` (k = ``num_keep(N, masking.rec_ratio)`` per modality, pack's
    ``keep=`` form: static shapes), ``ids_restore [b, N]`` int64, ``mask [b, N]`` float32.

    - Seeding: ``pack(seed=train.seed, step=step)`` draws sample ``i``'s stream from (seed, step, i).
      The global batch index of local row ``j`` is ``rank * b + j``; the packer numbers samples from
      0, so it packs ``(rank + 1) * b`` rows with ``valid = 0`` (nothing drawn, k = 0) for the rows
      of lower ranks and keeps its own. DDP ranks together draw exactly the single-process masks,
      and a resume is exact (masks depend on seed/step/index only). Cost: rank r writes r * b idle rows.
    - Audio padding patches are never visible, except for a sample with fewer than k valid
      patches (a window of under ``ceil(k / rows)`` real columns): the fixed-k form cannot hold it,
      so its valid prefix is widened to ``ceil(k / rows)`` columns, i.e. only the padding columns
      nearest the real audio may be visible. ``fallbacks`` counts such samples. Video is fully valid.
    - Buffers: with ``pinned`` (CUDA), a ring of two fixed pinned slots; before a slot is rewritten
      the host waits for the event recorded after its previous H2D copy (two steps ago, normally
      long done). Without, fresh CPU buffers each call (the model then reads them directly, so a
      reused buffer would alias the previous step's masks).
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, pinned: bool | None = None,
                 backend: str = "auto"):
        from tgdp import pack
        from tgdp.masking import num_keep

        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg, self.rank, self.backend = cfg, rank, backend
        self.local = cfg.train.batch_size // world_size
        self.rows = (rank + 1) * self.local
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self.fallbacks = 0
        self._geo = {}
        for mod in ("audio", "video"):
            kw = pack.config_kwargs(cfg, mod)
            ratio = kw.pop("ratio")
            self._geo[mod] = dict(kw, keep=num_keep(kw["num_patches"], ratio))
        self._slots = [self._alloc() for _ in range(2)] if self.pinned else None
        self._events = [torch.cuda.Event() for _ in range(2)] if self.pinned else [None, None]
        self._turn = 0

    def _alloc(self) -> dict:
        from tgdp import pack

        out = {}
        for mod, g in self._geo.items():
            kcap, tcap = pack.capacities(self.rows, g["num_patches"], keep=g["keep"],
                                         extra_front=g["extra_front"], extra_back=g["extra_back"])
            n = g["num_patches"]
            mk = dict(pin_memory=self.pinned)
            out[mod] = pack.PackBuffers(torch.empty(self.rows, kcap, dtype=torch.long, **mk),
                                        torch.empty(self.rows, n, dtype=torch.long, **mk),
                                        torch.empty(self.rows, n, dtype=torch.float32, **mk),
                                        torch.empty(self.rows + 1, dtype=torch.int32),
                                        torch.empty(tcap, dtype=torch.long), torch.empty(tcap, dtype=torch.int32))
        return out

    def __call__(self, step: int, audio_valid) -> tuple[tuple[Masks, Masks], object]:
        """((audio, video) host Masks of the local rows, CUDA event to record after their copy or None)."""
        from tgdp import pack

        va = np.asarray(audio_valid.numpy() if isinstance(audio_valid, torch.Tensor) else audio_valid,
                        dtype=np.int64)
        if va.shape != (self.local,):
            raise ValueError(f"audio_valid has shape {va.shape}, expected ({self.local},) (local batch)")
        ga = self._geo["audio"]
        rows_f, cols = ga["grid"]
        if va.min() < 0 or va.max() > cols:
            raise ValueError(f"audio_valid values {va.min()}..{va.max()} must be in [0, {cols}] time columns")
        need = -(-ga["keep"] // rows_f)              # columns that hold k patches
        short = va * rows_f < ga["keep"]
        self.fallbacks += int(short.sum())
        off = self.rank * self.local
        valid = {"audio": np.zeros(self.rows, np.int64), "video": np.zeros(self.rows, np.int64)}
        valid["audio"][off:] = np.where(short, need, va)
        valid["video"][off:] = self._geo["video"]["num_patches"]
        slot, event = self._turn, self._events[self._turn]
        self._turn = (self._turn + 1) % 2
        if event is not None:
            event.synchronize()   # the slot's previous H2D copy must be done before it is rewritten
        bufs = self._slots[slot] if self._slots is not None else self._alloc()
        res = []
        for mod in ("audio", "video"):
            pack.pack(valid[mod], seed=self.cfg.train.seed, step=step, out=bufs[mod], backend=self.backend,
                      **self._geo[mod])
            b = bufs[mod]
            res.append(Masks(b.ids_keep[off:], b.ids_restore[off:], b.mask[off:]))
        return (res[0], res[1]), event


def host_rec_masks(cfg: Config, step: int, audio_valid, rank: int = 0, world_size: int = 1,
                   backend: str = "auto") -> tuple[Masks, Masks]:
    """One-off :class:`HostMasks` call (tests, tools): host (audio, video) Masks of this rank's rows."""
    return HostMasks(cfg, rank, world_size, pinned=False, backend=backend)(step, audio_valid)[0]


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
        self.host_masks = HostMasks(cfg, rank, world_size) if cfg.data.host_masks else None

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.model
        g = torch.Generator().manual_seed(_sample_seed(self.cfg.train.seed, index))
        audio = torch.randn(m.audio_length, m.n_mels, generator=g)
        frames = torch.randn(m.in_chans, m.img_size, m.img_size, generator=g)
        return audio, frames

    def next(self) -> TrainBatch:
        first = self.step * self.cfg.train.batch_size + self.rank * self.local
        pairs = [self.sample(first + j) for j in range(self.local)]
        b = TrainBatch(torch.stack([a for a, _ in pairs]), torch.stack([f for _, f in pairs]))
        if self.host_masks is not None:   # noise is real signal everywhere: every column valid
            b.masks_rec, b.masks_event = self.host_masks(self.step, np.full(self.local, self.cfg.model.audio_grid[1]))
        self.step += 1
        return b

    def state_dict(self) -> dict:
        return {"kind": "random", "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class LoaderSource:
    """Endless iteration over a ``make_loader`` train loader, epoch by epoch, with a resumable position."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, root: str | None = None):
        from tgdp.data.loader import make_loader

        self.loader = make_loader(cfg, "train", rank, world_size, root=root)
        self.loader_batch = cfg.train.batch_size // world_size
        self.epoch, self.consumed = 0, 0
        self.step = 0   # batches handed out in the run (= training step): seeds the host masks
        self.host_masks = HostMasks(cfg, rank, world_size) if cfg.data.host_masks else None
        self._it = None
        self._replayed: dict = {}   # skips met again while a resume replays its epoch (counted before)

    @property
    def skipped(self) -> dict:
        """Corrupt samples skipped by this process's loader, by reason (a resume's replay excluded)."""
        from collections import Counter
        return dict(Counter(getattr(self.loader, "skipped", {})) - Counter(self._replayed))

    def _open(self) -> None:
        self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)

    def next(self) -> TrainBatch:
        if self._it is None:
            self._open()
            for _ in range(self.consumed):  # resume: replay the deterministic order up to the position
                next(self._it)
            self._replayed = dict(getattr(self.loader, "skipped", {}))
        for _ in range(2):
            try:
                b = next(self._it)
                break
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                self._open()
        else:
            from tgdp.cli import UserError
            raise UserError(f"the training data yields no full batch of {self.loader_batch} clips (after "
                            f"skipping corrupt samples: {self.skipped or 'none'}); lower --train.batch_size "
                            "or add data")
        self.consumed += 1
        out = TrainBatch(b.audio, b.frames)
        if self.host_masks is not None:
            if b.audio_valid is None:
                raise RuntimeError(f"data.host_masks needs the valid audio columns per window, which the "
                                   f"{getattr(self.loader, 'backend', '?')} loader did not give")
            out.masks_rec, out.masks_event = self.host_masks(self.step, b.audio_valid)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"kind": "loader", "epoch": self.epoch, "consumed": self.consumed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if self.host_masks is not None and "step" not in state:
            raise ValueError("data.host_masks: the checkpoint's data position has no 'step' (older "
                             "checkpoint), so the masks cannot continue exactly")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.step = int(state.get("step", 0))
        self._it = None


class CachedSource:
    """``data.cache_frames = K > 0``: the split is decoded once through the loader in retrieval mode
    (the torch loader's exact preprocessing: fbank, windows, image transform), K evenly spaced frames per clip
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
        audio, frames, valid = [], [], []
        f = d.frames_per_clip
        for b in loader:
            n = len(b.ids)
            audio.append(b.audio.reshape(n, f, *b.audio.shape[1:])[:, self.keep].to(torch.float16))
            frames.append(b.frames.reshape(n, f, *b.frames.shape[1:])[:, self.keep].to(torch.float16))
            if b.audio_valid is not None:
                valid.append(b.audio_valid.reshape(n, f)[:, self.keep])
        self.host_masks = HostMasks(cfg, rank, world_size) if d.host_masks else None
        if self.host_masks is not None and len(valid) != len(audio):
            raise RuntimeError("data.host_masks needs the valid audio columns per window, which the "
                               "DALI loader does not give; use data.loader=torch")
        self.valid = torch.cat(valid) if valid and len(valid) == len(audio) else None   # [N, K]
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
        b = TrainBatch(self.audio[rows, frame[rows]].float(), self.frames[rows, frame[rows]].float())
        if self.host_masks is not None:
            b.masks_rec, b.masks_event = self.host_masks(self.step, self.valid[rows, frame[rows]])
        self.step += 1
        return b

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
