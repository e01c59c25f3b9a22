"""Reference masked reconstruction loss (spec §4.1), plain torch.

Also holds :func:`check_inputs`, the one input validation shared by ``tgdp.ops`` (before dispatch)
and the Triton launchers in ``kernels/masked_mse.py``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from tgdp.patching import patchify

__all__ = ["masked_mse", "check_inputs"]


def check_inputs(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool) -> None:
    """Raise ValueError/TypeError (naming the shapes) unless the inputs fit :func:`masked_mse`.

    Reads only metadata, so it costs no host sync and traces under compile.
    """
    for name, t in (("pred", pred), ("imgs", imgs), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"masked_mse: {name} must be a Tensor, got {type(t).__name__}")
    if not pred.is_floating_point() or not imgs.is_floating_point():
        raise TypeError(f"masked_mse: pred ({pred.dtype}) and imgs ({imgs.dtype}) must be floating point")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"masked_mse: mask must be float or bool, got {mask.dtype}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size < 1:
        raise ValueError(f"masked_mse: patch_size={patch_size!r} must be a positive int")
    if pred.dim() != 3:
        raise ValueError(f"masked_mse: pred must be [B, N, P], got shape {tuple(pred.shape)}")
    if imgs.dim() != 4:
        raise ValueError(f"masked_mse: imgs must be [B, C, H, W], got shape {tuple(imgs.shape)}")
    if mask.dim() != 2:
        raise ValueError(f"masked_mse: mask must be [B, N], got shape {tuple(mask.shape)}")
    b, c, h, w = imgs.shape
    p = patch_size
    if b == 0 or c == 0 or h == 0 or w == 0:
        raise ValueError(f"masked_mse: empty imgs, shape {tuple(imgs.shape)}")
    if h % p or w % p:
        raise ValueError(f"masked_mse: imgs {h}x{w} (shape {tuple(imgs.shape)}) not divisible by patch_size={p}")
    n, dim = (h // p) * (w // p), p * p * c
    if tuple(pred.shape) != (b, n, dim):
        raise ValueError(f"masked_mse: pred shape {tuple(pred.shape)} != [B, (H/p)(W/p), p*p*C] = "
                         f"{(b, n, dim)} for imgs {tuple(imgs.shape)}, patch_size={p}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"masked_mse: mask shape {tuple(mask.shape)} != [B, N] = {(b, n)}")
    if norm_pix and dim < 2:
        raise ValueError(f"masked_mse: norm_pix needs >= 2 values per patch for the unbiased variance, "
                         f"got p*p*C = {dim}")
    if not (pred.device == imgs.device == mask.device):
        raise ValueError(f"masked_mse: pred on {pred.device}, imgs on {imgs.device}, mask on {mask.device}")


def masked_mse(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = False,
               upcast: bool = True) -> Tensor:
    """Mean squared error over masked patches only, pooled over the batch.

    pred:  [B, N, p*p*C] decoder predictions
    imgs:  [B, C, H, W] raw input (video frames, or audio viewed with ``audio_as_image``)
    mask:  [B, N] 1 = masked (contributes), 0 = visible
    norm_pix: standardise each target patch by its mean and *unbiased* variance (+1e-6).
    upcast: compute in fp32 (False: in the inputs' dtype, the "plain torch at low precision" baseline).
    Returns a 0-dim tensor: sum_b,n mask * mean_d (pred - target)^2 / sum mask (NaN if sum mask = 0).
    """
    check_inputs(pred, imgs, mask, patch_size, norm_pix)
    target = patchify(imgs, patch_size)
    if upcast:
        pred, target, mask = pred.float(), target.float(), mask.float()
    else:
        mask = mask.to(pred.dtype)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
