"""Per-frame audio windows cut from a clip's full fbank (spec §5.2 steps 4-7).

fbank ``[B, F, M]`` -> pad/cut to ``data.fbank_frames`` (1024) -> a ``model.audio_length`` (416) row
window per video frame -> optional circular time shift (train) -> ``(x - mean) / std``.

Window centre for video frame ``i`` (``data.window``):

- ``"frame_time"`` (default): ``round(frame_time * 100)``, the fbank row at the frame's timestamp
  (10 ms hop), so the sound heard at a frame sits in the middle of its window.
- ``"official"``: ``round(i * S / K)`` = ``64 * i`` for S = 1024, K = 16 (CAV-MAE Sync); it drifts
  from the frame time by up to 0.24 s at i = 15.

start = clamp(centre - L // 2, 0, S - L). ``torch.round`` rounds half to even, like Python's
``round`` in the official code.
"""

from __future__ import annotations

import torch

from tgdp.data.fbank import LOG_FLOOR

__all__ = ["pad_or_cut", "window_starts", "cut_windows", "time_shift", "sample_shifts", "normalize",
           "audio_windows"]

_PADS = ("floor", "zero")
_MODES = ("frame_time", "official")


def pad_or_cut(fb: torch.Tensor, target: int = 1024, num_frames: torch.Tensor | None = None,
               pad: str = "floor") -> torch.Tensor:
    """Pad (or truncate) the time axis to ``target`` rows.

    Args:
        fb: ``[B, F, M]`` or ``[F, M]`` log-Mel.
        num_frames: optional ``[B]`` valid rows per clip (rows at or past it are padding too).
        pad: ``"floor"`` = ``log(FLT_EPSILON)``, what silence gives (default); ``"zero"`` = 0.0 in the
            log domain, the official loader's value (≈ +1.13 after normalisation, a bug).

    Returns:
        ``[B, target, M]`` (``[target, M]`` for 2-D input).
    """
    if pad not in _PADS:
        raise ValueError(f"pad={pad!r} must be one of {list(_PADS)}")
    if fb.dim() not in (2, 3):
        raise ValueError(f"fbank must be [F, M] or [B, F, M], got shape {tuple(fb.shape)}")
    if target < 1:
        raise ValueError(f"target={target} must be >= 1")
    squeeze = fb.dim() == 2
    x = fb.unsqueeze(0) if squeeze else fb
    value = LOG_FLOOR if pad == "floor" else 0.0
    f = x.shape[1]
    if f >= target:
        x = x[:, :target]
    else:
        x = torch.nn.functional.pad(x, (0, 0, 0, target - f), value=value)
    if num_frames is not None:
        keep = torch.arange(target, device=x.device).unsqueeze(0) < num_frames.to(x.device).unsqueeze(1)
        x = torch.where(keep.unsqueeze(-1), x, torch.full((), value, dtype=x.dtype, device=x.device))
    return x[0] if squeeze else x


def window_starts(frame_idx: torch.Tensor, frame_time: torch.Tensor | None = None, *, mode: str = "frame_time",
                  total: int = 1024, length: int = 416, frames_per_clip: int = 16) -> torch.Tensor:
    """First fbank row of each window.

    Args:
        frame_idx: ``[B]`` long, video frame index in ``[0, frames_per_clip)``.
        frame_time: ``[B]`` float seconds of that frame (needed for ``mode="frame_time"``).

    Returns:
        ``[B]`` long in ``[0, total - length]``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} must be one of {list(_MODES)}")
    if length > total:
        raise ValueError(f"window length={length} is longer than the padded fbank total={total}")
    if mode == "official":
        centre = torch.round(frame_idx.double() * (total / frames_per_clip))
    else:
        if frame_time is None:
            raise ValueError("mode='frame_time' needs frame_time (seconds per sample)")
        centre = torch.round(frame_time.double() * 100.0)  # 10 ms fbank hop
    start = centre.long() - length // 2
    return start.clamp(0, total - length)


def cut_windows(fb: torch.Tensor, starts: torch.Tensor, length: int = 416) -> torch.Tensor:
    """``fb [B, S, M]``, ``starts [B]`` -> ``[B, length, M]`` (rows ``starts[b] : starts[b] + length``)."""
    rows = starts.to(fb.device).unsqueeze(1) + torch.arange(length, device=fb.device)  # [B, L]
    return torch.gather(fb, 1, rows.unsqueeze(-1).expand(-1, -1, fb.shape[-1]))


def sample_shifts(n: int, max_frac: float, length: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` long shifts uniform in ``{-floor(max_frac*length) .. +floor(max_frac*length)}`` (spec §5.2 step 6)."""
    m = int(max_frac * length)
    return torch.randint(-m, m + 1, (n,), generator=generator, device=generator.device)


def time_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Circular shift of each window along time, like ``torch.roll(x[b], shifts[b], 0)``.

    ``x: [B, L, M]``, ``shifts: [B]`` long -> ``[B, L, M]``.
    """
    length = x.shape[1]
    src = (torch.arange(length, device=x.device).unsqueeze(0) - shifts.to(x.device).unsqueeze(1)) % length
    return torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def normalize(x: torch.Tensor, mean: float = -5.081, std: float = 4.4849) -> torch.Tensor:
    """``(x - mean) / std`` with the CAV-MAE AudioSet statistics."""
    if not std > 0:
        raise ValueError(f"std={std} must be > 0")
    return (x - mean) / std


def audio_windows(fb: torch.Tensor, frame_idx: torch.Tensor, frame_time: torch.Tensor | None = None, *,
                  num_frames: torch.Tensor | None = None, data=None, length: int = 416,
                  shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Full recipe: pad/cut, window, optional shift, normalise.

    Args:
        fb: ``[B, F, M]`` log-Mel of whole clips (``tgdp.data.fbank.fbank``).
        frame_idx: ``[B]`` long video frame per row; ``frame_time``: ``[B]`` float seconds.
        num_frames: ``[B]`` valid fbank rows per clip (ragged batches).
        data: a ``tgdp.configs.DataConfig`` (pad, window, fbank_frames, mean/std, frames_per_clip);
            default ``DataConfig()``.
        length: window rows (``model.audio_length``).
        shifts: ``[B]`` long circular shifts (train time shift; ``None`` = no shift).

    Returns:
        ``[B, length, M]`` normalised windows.
    """
    if data is None:
        from tgdp.configs import DataConfig
        data = DataConfig()
    if fb.dim() != 3 or frame_idx.shape != (fb.shape[0],):
        raise ValueError(f"fbank must be [B, F, M] and frame_idx [B]; got {tuple(fb.shape)} and "
                         f"{tuple(frame_idx.shape)}")
    full = pad_or_cut(fb, data.fbank_frames, num_frames, data.pad)
    starts = window_starts(frame_idx, frame_time, mode=data.window, total=data.fbank_frames, length=length,
                           frames_per_clip=data.frames_per_clip)
    win = cut_windows(full, starts, length)
    if shifts is not None:
        win = time_shift(win, shifts)  # before normalisation, as the official loader
    return normalize(win, data.fbank_mean, data.fbank_std)
