"""Input checks shared by the reference model, the fast model and :class:`tgdp.method.TGDP`.

Every check raises ``ValueError`` (or ``TypeError`` for a non-tensor / wrong dtype) naming the
offending value *before* any compute. Shape checks read only metadata (no device sync); the
finite-value check reads the data and syncs with the device, so hot loops can switch it off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tgdp.configs import ModelConfig

__all__ = ["check_inputs", "check_masks"]


def check_inputs(audio: Tensor, frames: Tensor, cfg: ModelConfig, check_finite: bool = True) -> None:
    """audio: [B, T, F] with T = cfg.audio_length (a multiple of patch_size) and F = cfg.n_mels;
    frames: [B, C, S, S] with C = cfg.in_chans and S = cfg.img_size; same B >= 1; floating dtype."""
    for name, t in (("audio", audio), ("frames", frames)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} dtype={t.dtype} must be a floating dtype")
    if audio.dim() != 3:
        raise ValueError(f"audio must be [B, T, n_mels], got shape {tuple(audio.shape)}")
    if frames.dim() != 4:
        raise ValueError(f"frames must be [B, C, H, W], got shape {tuple(frames.shape)}")
    b, t, f = audio.shape
    p = cfg.patch_size
    if b < 1:
        raise ValueError(f"batch size B={b} (audio shape {tuple(audio.shape)}) must be >= 1")
    if frames.shape[0] != b:
        raise ValueError(f"frames batch={frames.shape[0]} != audio batch={b}")
    if t % p:
        raise ValueError(f"audio length T={t} is not a multiple of patch_size={p}")
    if t != cfg.audio_length:
        raise ValueError(f"audio length T={t} != model.audio_length={cfg.audio_length}")
    if f != cfg.n_mels:
        raise ValueError(f"audio mel bins F={f} != model.n_mels={cfg.n_mels}")
    c, h, w = frames.shape[1:]
    if c != cfg.in_chans:
        raise ValueError(f"frames channels C={c} != model.in_chans={cfg.in_chans}")
    if h != cfg.img_size or w != cfg.img_size:
        raise ValueError(f"frames size {h}x{w} != model.img_size={cfg.img_size}")
    if audio.device != frames.device:
        raise ValueError(f"audio device={audio.device} != frames device={frames.device}")
    if check_finite:
        # Host sync: reads the data. Off in the GPU hot loop (TGDP.check_finite = False).
        for name, x in (("audio", audio), ("frames", frames)):
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                n_bad = int(bad.sum())
                raise ValueError(f"{name} has {n_bad} non-finite values (NaN/inf), "
                                 f"e.g. at index {tuple(bad.nonzero()[0].tolist())}")


def check_masks(masks, batch: int, n: int, name: str) -> None:
    """Masks for ``batch`` rows of ``n`` patches: ids_keep [B, k], ids_restore [B, n], mask [B, n]."""
    ik, ir, m = masks.ids_keep, masks.ids_restore, masks.mask
    if ik.dim() != 2 or ik.shape[0] != batch or not 1 <= ik.shape[1] <= n:
        raise ValueError(f"{name}.ids_keep shape {tuple(ik.shape)} must be [{batch}, k] with 1 <= k <= {n}")
    if tuple(ir.shape) != (batch, n):
        raise ValueError(f"{name}.ids_restore shape {tuple(ir.shape)} must be [{batch}, {n}]")
    if tuple(m.shape) != (batch, n):
        raise ValueError(f"{name}.mask shape {tuple(m.shape)} must be [{batch}, {n}]")
    if ik.dtype != torch.int64 or ir.dtype != torch.int64:
        raise TypeError(f"{name} ids must be int64, got {ik.dtype} / {ir.dtype}")
