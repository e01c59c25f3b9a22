"""Patchify / unpatchify, with the geometry taken from the config (spec §4.1).

An image ``[B, C, H, W]`` becomes ``[B, (H/p)(W/p), p*p*C]``: patches in row-major grid order, each
flattened as (row-in-patch, col-in-patch, channel) — channel last. Audio ``[B, T, F]`` (time-major
fbank) is first viewed as the image ``[B, 1, F, T]`` (frequency = height, time = width), which gives
the official token order ``f * (T/p) + t``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["audio_as_image", "image_as_audio", "patchify", "unpatchify"]


def audio_as_image(audio: Tensor) -> Tensor:
    """audio: [B, T, F] -> [B, 1, F, T] (a view, no copy)."""
    if audio.dim() != 3:
        raise ValueError(f"audio must be [B, T, F], got shape {tuple(audio.shape)}")
    return audio.transpose(1, 2).unsqueeze(1)


def image_as_audio(img: Tensor) -> Tensor:
    """[B, 1, F, T] -> audio [B, T, F]."""
    if img.dim() != 4 or img.shape[1] != 1:
        raise ValueError(f"expected [B, 1, F, T], got shape {tuple(img.shape)}")
    return img.squeeze(1).transpose(1, 2)


def patchify(img: Tensor, p: int) -> Tensor:
    """img: [B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]."""
    if img.dim() != 4:
        raise ValueError(f"img must be [B, C, H, W], got shape {tuple(img.shape)}")
    b, c, h, w = img.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = img.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, p(row), q(col), c
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: Tensor, p: int, grid: tuple[int, int], channels: int) -> Tensor:
    """x: [B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p] (inverse of :func:`patchify`)."""
    gh, gw = grid
    if x.dim() != 3 or x.shape[1] != gh * gw or x.shape[2] != p * p * channels:
        raise ValueError(f"expected [B, {gh * gw}, {p * p * channels}], got shape {tuple(x.shape)}")
    b = x.shape[0]
    x = x.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * p, gw * p)
