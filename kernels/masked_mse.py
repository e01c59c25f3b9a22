"""Fused masked reconstruction loss: patchify, per-patch norm, squared error and masking in one pass.

The target patch is read straight from the raw image with index math on its strides (so the
audio view ``audio.transpose(1, 2).unsqueeze(1)`` needs no copy): patch n = (gi, gj) on the
(H/p, W/p) grid, element e = (row r, col c, channel ch) channel-last, pixel
``img[b, ch, gi*p + r, gj*p + c]``. Neither the patchified target [B, N, p*p*C], its normalised
copy, nor (pred - target)^2 is materialised; the forward writes one fp32 per patch, and the backward
recomputes the target tile and writes grad_pred directly. All arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tgdp.kernels import interpreter_blocks, launch, next_pow2
from tgdp.reference.masked_mse import check_inputs

__all__ = ["masked_mse"]


@triton.jit
def _target_tile(IMG_ptr, b, offs_n, offs_e, valid,
                 stride_ib, stride_ic, stride_ih, stride_iw,
                 P, C, GW, PS, NORM_PIX: tl.constexpr):
    """Target patches [BLOCK_NP, BLOCK_P] fp32 (zero outside ``valid``), standardised if NORM_PIX."""
    gi = offs_n // GW
    gj = offs_n % GW
    r = offs_e // (PS * C)
    c = (offs_e // C) % PS
    ch = offs_e % C
    patch_off = gi * PS * stride_ih + gj * PS * stride_iw                  # [BLOCK_NP]
    elem_off = ch * stride_ic + r * stride_ih + c * stride_iw              # [BLOCK_P]
    t = tl.load(IMG_ptr + b * stride_ib + patch_off[:, None] + elem_off[None, :], mask=valid,
                other=0.0).to(tl.float32)
    if NORM_PIX:
        # Two-pass mean / unbiased variance in fp32, as torch's var.
        mean = tl.sum(t, axis=1) / P
        dev = tl.where(valid, t - mean[:, None], 0.0)
        var = tl.sum(dev * dev, axis=1) / (P - 1)
        t = dev / tl.sqrt(var + 1e-6)[:, None]
    return t


@triton.jit
def _masked_mse_fwd_kernel(
    PRED_ptr, IMG_ptr, MASK_ptr, OUT_ptr,       # pred [B, N, P]; img [B, C, H, W]; mask [B, N]; out [B, N] fp32
    stride_pb, stride_pn, stride_pe,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_mb, stride_mn,
    N, P, C, GW, PS,
    NORM_PIX: tl.constexpr, BLOCK_NP: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[b, n] = mask[b, n] * mean_e (pred[b, n, e] - target[b, n, e])^2."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_NP + tl.arange(0, BLOCK_NP)
    offs_e = tl.arange(0, BLOCK_P)
    n_valid = offs_n < N
    valid = n_valid[:, None] & (offs_e < P)[None, :]
    t = _target_tile(IMG_ptr, b, offs_n, offs_e, valid, stride_ib, stride_ic, stride_ih, stride_iw,
                     P, C, GW, PS, NORM_PIX)
    pred = tl.load(PRED_ptr + b * stride_pb + offs_n[:, None] * stride_pn + offs_e[None, :] * stride_pe,
                   mask=valid, other=0.0).to(tl.float32)
    diff = tl.where(valid, pred - t, 0.0)
    m = tl.load(MASK_ptr + b * stride_mb + offs_n * stride_mn, mask=n_valid, other=0).to(tl.float32)
    per_patch = tl.sum(diff * diff, axis=1) / P * m
    tl.store(OUT_ptr + b * N + offs_n, per_patch, mask=n_valid)


@triton.jit
def _masked_mse_bwd_kernel(
    GRAD_ptr, MSUM_ptr,                         # 0-dim: upstream grad of the loss, sum of the mask
    PRED_ptr, IMG_ptr, MASK_ptr, DPRED_ptr,     # dpred [B, N, P] in pred's dtype
    stride_pb, stride_pn, stride_pe,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_mb, stride_mn,
    stride_db, stride_dn, stride_de,
    N, P, C, GW, PS,
    NORM_PIX: tl.constexpr, BLOCK_NP: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dpred[b, n, e] = grad * 2 mask[b, n] (pred - target) / (P * sum(mask)); the target is recomputed."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_NP + tl.arange(0, BLOCK_NP)
    offs_e = tl.arange(0, BLOCK_P)
    n_valid = offs_n < N
    valid = n_valid[:, None] & (offs_e < P)[None, :]
    t = _target_tile(IMG_ptr, b, offs_n, offs_e, valid, stride_ib, stride_ic, stride_ih, stride_iw,
                     P, C, GW, PS, NORM_PIX)
    pred = tl.load(PRED_ptr + b * stride_pb + offs_n[:, None] * stride_pn + offs_e[None, :] * stride_pe,
                   mask=valid, other=0.0).to(tl.float32)
    m = tl.load(MASK_ptr + b * stride_mb + offs_n * stride_mn, mask=n_valid, other=0).to(tl.float32)
    # Read on device: the mask sum never goes through the host (no sync).
    g = tl.load(GRAD_ptr).to(tl.float32)
    msum = tl.load(MSUM_ptr).to(tl.float32)
    coef = m * (2.0 * g / (P * msum))
    dpred = coef[:, None] * (pred - t)
    tl.store(DPRED_ptr + b * stride_db + offs_n[:, None] * stride_dn + offs_e[None, :] * stride_de,
             dpred.to(DPRED_ptr.dtype.element_ty), mask=valid)


def _blocks(n: int, p: int) -> tuple[int, int]:
    block_p = next_pow2(p)
    budget = 16384 if interpreter_blocks() else 4096    # elements per program (interpreter: fewer programs)
    return max(1, min(next_pow2(n), budget // block_p)), block_p


def _geometry(imgs: Tensor, patch_size: int) -> tuple[int, int, int]:
    _, c, _, w = imgs.shape
    return patch_size * patch_size * c, c, w // patch_size


def _mask_arg(mask: Tensor) -> Tensor:
    # Triton loads torch.bool as int1 pointers awkwardly; a uint8 view is the same bytes.
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@torch.library.custom_op("tgdp::masked_mse", mutates_args=())
def _masked_mse_op(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool) -> Tensor:
    check_inputs(pred, imgs, mask, patch_size, norm_pix)
    b, n, _ = pred.shape
    p_dim, c, gw = _geometry(imgs, patch_size)
    per_patch = torch.empty(b, n, dtype=torch.float32, device=pred.device)
    block_np, block_p = _blocks(n, p_dim)
    launch(_masked_mse_fwd_kernel, (triton.cdiv(n, block_np), b),
        pred, imgs, _mask_arg(mask), per_patch, *pred.stride(), *imgs.stride(), *mask.stride(),
        n, p_dim, c, gw, patch_size, NORM_PIX=norm_pix, BLOCK_NP=block_np, BLOCK_P=block_p)
    # [B, N] fp32 partials summed by torch: deterministic, unlike a global atomic_add.
    return per_patch.sum() / mask.sum(dtype=torch.float32)


@_masked_mse_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("tgdp::masked_mse_backward", mutates_args=())
def _masked_mse_backward_op(grad: Tensor, pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int,
                            norm_pix: bool) -> Tensor:
    """grad: 0-dim -> grad_pred [B, N, P] in pred's dtype."""
    check_inputs(pred, imgs, mask, patch_size, norm_pix)
    if grad.numel() != 1 or grad.device != pred.device:
        raise ValueError(f"masked_mse backward: grad must be one value on {pred.device}, got shape "
                         f"{tuple(grad.shape)} on {grad.device}")
    b, n, _ = pred.shape
    p_dim, c, gw = _geometry(imgs, patch_size)
    msum = mask.sum(dtype=torch.float32)
    dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    block_np, block_p = _blocks(n, p_dim)
    launch(_masked_mse_bwd_kernel, (triton.cdiv(n, block_np), b),
        grad, msum, pred, imgs, _mask_arg(mask), dpred, *pred.stride(), *imgs.stride(), *mask.stride(),
        *dpred.stride(), n, p_dim, c, gw, patch_size, NORM_PIX=norm_pix, BLOCK_NP=block_np,
        BLOCK_P=block_p)
    return dpred


@_masked_mse_backward_op.register_fake
def _(grad, pred, imgs, mask, patch_size, norm_pix):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _backward(ctx, grad):
    pred, imgs, mask = ctx.saved_tensors
    # Only pred gets a gradient: the target and the mask are data.
    return _masked_mse_backward_op(grad, pred, imgs, mask, ctx.patch_size, ctx.norm_pix), None, None, None, None


_masked_mse_op.register_autograd(_backward, setup_context=_setup_context)


def masked_mse(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = False) -> Tensor:
    """Triton twin of :func:`tgdp.reference.masked_mse.masked_mse` (fp32 math always).

    pred: [B, N, p*p*C]; imgs: [B, C, H, W] (any strides); mask: [B, N] float/bool, 1 = masked.
    Returns a 0-dim fp32 loss; differentiable in ``pred`` only.
    """
    check_inputs(pred, imgs, mask, patch_size, norm_pix)
    return _masked_mse_op(pred, imgs.detach(), mask.detach(), int(patch_size), bool(norm_pix))
