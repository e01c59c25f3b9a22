"""What both data paths share: the :class:`Batch` they hand out, the per-sample random streams and
the valid-audio computation (:mod:`tgdp.data.loader`, the torch path, and :mod:`tgdp.data.dali` both
import it; neither imports the other at module level).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

__all__ = ["Batch", "sample_generator", "valid_time_columns", "IMAGENET_MEAN", "IMAGENET_STD", "MODES", "SKIP_REASONS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("train", "eval", "retrieval")
# Skip-counter keys of both loaders (DALI adds "bad sample" for an error it cannot attribute).
SKIP_REASONS = ("missing member", "bad metadata", "checksum", "bad image", "bad audio", "wrong sample rate",
                "short audio", "bad shard", "bad sample")


@dataclass
class Batch:
    """One batch. ``audio: [B, T, n_mels]``, ``frames: [B, 3, S, S]`` float32, ``frame_idx: [B]`` long.

    ``labels`` and ``ids`` have one entry per *video*: B in train/eval, where rows are videos, and B
    in retrieval, where the ``B * frames_per_clip`` rows are video-major (rows ``b*K .. b*K+K-1``
    are the K frames of video ``b``, ``frame_idx`` = ``0..K-1`` repeated).
    ``skipped`` counts corrupt samples (by reason) met since the previous batch of the same worker.
    ``audio_valid: [rows]`` long (host tensor, both loaders): time columns of each audio window's
    patch grid that hold only real audio, a prefix of the window (see :func:`valid_time_columns`).
    """

    audio: torch.Tensor
    frames: torch.Tensor
    labels: list[list[str]]
    ids: list[str]
    frame_idx: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)
    audio_valid: torch.Tensor | None = None

    def __len__(self) -> int:
        """Number of videos (``len(ids)``); rows are ``audio.shape[0]``."""
        return len(self.ids)

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader ``pin_memory=True`` calls this), so ``to(cuda, non_blocking)`` is async."""
        return Batch(self.audio.pin_memory(), self.frames.pin_memory(), self.labels, self.ids,
                     self.frame_idx.pin_memory(), dict(self.skipped), self.audio_valid)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.audio.to(device, non_blocking=non_blocking),
                     self.frames.to(device, non_blocking=non_blocking), self.labels, self.ids,
                     self.frame_idx.to(device, non_blocking=non_blocking), dict(self.skipped),
                     self.audio_valid)  # host-side: it feeds the host packer, never the device


def sample_generator(seed: int, epoch: int, key: str, purpose: str = "frame") -> torch.Generator:
    """CPU generator for one random choice (``purpose``: "frame" or "shift") of one sample in one epoch.

    Seeded from a hash of (seed, epoch, key, purpose): reproducible, independent of sample order,
    worker split and world size, and each choice has its own stream (so forcing the frame, or
    DALI choosing it, leaves the time shift unchanged).
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}:{purpose}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def valid_time_columns(real_rows: torch.Tensor, starts: torch.Tensor, length: int, patch: int,
                       shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Audio patch columns of each window that hold only real audio: ``[R]`` long.

    real_rows: ``[R]`` real fbank rows of the clip after pad/cut (``min(frames, data.fbank_frames)``);
    starts: ``[R]`` first fbank row of each window; shifts: ``[R]`` circular time shifts or None.
    A window row ``t`` is real iff its source row ``starts + ((t - shift) mod length)`` is below
    ``real_rows``. The count is the longest *prefix* of real rows, floored to whole patches: a patch
    is visible only if every one of its ``patch`` rows is real audio (floor, not ceil), and the
    packer's grid form takes a prefix of columns. Without a shift the real rows of a window are a
    prefix anyway; a shift that moves padding to the front shortens the prefix (conservative).
    """
    t = torch.arange(length)
    src = t.unsqueeze(0) if shifts is None else (t.unsqueeze(0) - shifts.view(-1, 1)) % length
    real = (starts.view(-1, 1) + src) < real_rows.view(-1, 1)          # [R, length]
    prefix = real.long().cumprod(dim=1).sum(dim=1)
    return prefix // patch
