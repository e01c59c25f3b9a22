"""Fused top-k visible-token selection: rank-by-comparison per row, then a row gather.

Each score's position in the stable descending order is counted directly,
``rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}`` (NaN counts as the largest value, as in
``torch.sort``), in tiles of [BLOCK_I, BLOCK_J] comparisons. That rank *is* ``ids_restore[i]``; the
kernel also writes ``ids_keep[rank_i] = i`` for ranks below k and the mask, so no sorted copy, no
argsort and no ones-then-gather mask are materialised. The gather of the visible tokens reads each
kept row once; its backward writes every token row once from ``ids_restore`` (a kept row copies its
gradient, a removed row gets zeros), with no zero fill followed by a scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tgdp.kernels import interpreter_blocks, launch, next_pow2
from tgdp.reference.topk_visible import check_inputs

__all__ = ["topk_visible"]


@triton.jit
def _rank_kernel(
    S_ptr, KEEP_ptr, RESTORE_ptr, MASK_ptr,           # scores [B, N]; ids_keep [B, k]; ids_restore, mask [B, N]
    stride_sb, stride_sn, stride_kb, stride_rb, stride_mb,
    N, K,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_valid = offs_i < N
    s_i = tl.load(S_ptr + b * stride_sb + offs_i * stride_sn, mask=i_valid, other=0.0).to(tl.float32)
    num_i = (s_i == s_i)[:, None]                      # False for NaN
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_valid = offs_j < N
        s_j = tl.load(S_ptr + b * stride_sb + offs_j * stride_sn, mask=j_valid, other=0.0).to(tl.float32)
        num_j = (s_j == s_j)[None, :]
        nan_j = (s_j != s_j)[None, :]
        lower = offs_j[None, :] < offs_i[:, None]
        si = s_i[:, None]
        sj = s_j[None, :]
        # j precedes i: larger value, or equal value at a lower index; NaN precedes every number.
        before = (num_i & num_j & ((sj > si) | ((sj == si) & lower))) | (nan_j & (num_i | lower))
        before = before & j_valid[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(RESTORE_ptr + b * stride_rb + offs_i, rank.to(tl.int64), mask=i_valid)
    tl.store(MASK_ptr + b * stride_mb + offs_i, (rank >= K).to(tl.float32), mask=i_valid)
    tl.store(KEEP_ptr + b * stride_kb + rank, offs_i.to(tl.int64), mask=i_valid & (rank < K))


@triton.jit
def _gather_rows_kernel(
    X_ptr, IDS_ptr, OUT_ptr,                           # x: [B, N, D]; ids_keep: [B, k]; out: [B, k, D]
    stride_xb, stride_xn, stride_xd, stride_ib, stride_ik, stride_ob, stride_ok, stride_od,
    K, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_valid = offs_r < K
    valid = r_valid[:, None] & (offs_d < D)[None, :]
    idx = tl.load(IDS_ptr + b * stride_ib + offs_r * stride_ik, mask=r_valid, other=0)
    x = tl.load(X_ptr + b * stride_xb + idx[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=valid, other=0.0)
    tl.store(OUT_ptr + b * stride_ob + offs_r[:, None] * stride_ok + offs_d[None, :] * stride_od, x,
             mask=valid)


@triton.jit
def _scatter_rows_kernel(
    G_ptr, RESTORE_ptr, OUT_ptr,                       # grad_visible: [B, k, D]; ids_restore: [B, N]; out: [B, N, D]
    stride_gb, stride_gk, stride_gd, stride_rb, stride_rn, stride_ob, stride_on, stride_od,
    N, K, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = (offs_d < D)[None, :]
    r = tl.load(RESTORE_ptr + b * stride_rb + offs_n * stride_rn, mask=n_valid, other=K)
    kept = (n_valid & (r < K))[:, None]
    g = tl.load(G_ptr + b * stride_gb + r[:, None] * stride_gk + offs_d[None, :] * stride_gd,
                mask=kept & d_valid, other=0.0)
    tl.store(OUT_ptr + b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od, g,
             mask=n_valid[:, None] & d_valid)


def _check_ids(x: Tensor, ids_keep: Tensor | None, ids_restore: Tensor, name: str) -> None:
    """Launcher guard for the row kernels (the indices come from :func:`topk_indices`)."""
    ids = [t for t in (ids_keep, ids_restore) if t is not None]
    if x.dim() != 3 or any(t.dim() != 2 or t.dtype != torch.int64 or t.shape[0] != x.shape[0] for t in ids):
        raise ValueError(f"{name} must be [B, *, D] with int64 [B, *] indices, got {name} {tuple(x.shape)}, "
                         f"ids {[(tuple(t.shape), t.dtype) for t in ids]}")
    if any(t.device != x.device for t in ids):
        raise ValueError(f"{name} on {x.device} but ids on {[str(t.device) for t in ids]}")
    if ids_keep is not None and (x.shape[1] != ids_restore.shape[1] or ids_keep.shape[1] > x.shape[1]):
        raise ValueError(f"tokens {tuple(x.shape)} do not fit ids_keep {tuple(ids_keep.shape)} / "
                         f"ids_restore {tuple(ids_restore.shape)}")


def _row_blocks(rows: int, d: int) -> tuple[int, int]:
    if interpreter_blocks():   # few, large programs: each one is a Python call in the interpreter
        return min(next_pow2(rows), 256), min(next_pow2(d), 1024)
    return 16, min(next_pow2(d), 256)


@torch.library.custom_op("tgdp::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """scores: [B, N] -> ids_keep [B, k] int64, ids_restore [B, N] int64, mask [B, N] fp32 (1 = removed)."""
    check_inputs(scores, k, None)
    b, n = scores.shape
    ids_keep = torch.empty(b, k, dtype=torch.int64, device=scores.device)
    ids_restore = torch.empty(b, n, dtype=torch.int64, device=scores.device)
    mask = torch.empty(b, n, dtype=torch.float32, device=scores.device)
    block_i = block_j = min(next_pow2(n), 256) if interpreter_blocks() else 64
    launch(_rank_kernel, (triton.cdiv(n, block_i), b),
        scores, ids_keep, ids_restore, mask, *scores.stride(), ids_keep.stride(0),
        ids_restore.stride(0), mask.stride(0), n, k, BLOCK_I=block_i, BLOCK_J=block_j)
    return ids_keep, ids_restore, mask


@topk_indices.register_fake
def _(scores, k):
    b, n = scores.shape
    return (scores.new_empty((b, k), dtype=torch.int64), scores.new_empty((b, n), dtype=torch.int64),
            scores.new_empty((b, n), dtype=torch.float32))


@torch.library.custom_op("tgdp::gather_rows", mutates_args=())
def gather_rows(tokens: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
    """tokens: [B, N, D], ids_keep: [B, k], ids_restore: [B, N] (for the backward) -> [B, k, D]."""
    _check_ids(tokens, ids_keep, ids_restore, "tokens")
    b, _, d = tokens.shape
    k = ids_keep.shape[1]
    out = torch.empty(b, k, d, dtype=tokens.dtype, device=tokens.device)
    block_r, block_d = _row_blocks(k, d)
    launch(_gather_rows_kernel, (triton.cdiv(k, block_r), b, triton.cdiv(d, block_d)),
        tokens, ids_keep, out, *tokens.stride(), *ids_keep.stride(), *out.stride(), k, d,
        BLOCK_R=block_r, BLOCK_D=block_d)
    return out


@gather_rows.register_fake
def _(tokens, ids_keep, ids_restore):
    return tokens.new_empty((tokens.shape[0], ids_keep.shape[1], tokens.shape[2]))


@torch.library.custom_op("tgdp::scatter_rows", mutates_args=())
def scatter_rows(grad_visible: Tensor, ids_restore: Tensor) -> Tensor:
    """Backward of :func:`gather_rows`: grad_visible [B, k, D], ids_restore [B, N] -> grad_tokens [B, N, D]."""
    _check_ids(grad_visible, None, ids_restore, "grad_visible")
    b, k, d = grad_visible.shape
    n = ids_restore.shape[1]
    out = torch.empty(b, n, d, dtype=grad_visible.dtype, device=grad_visible.device)
    block_r, block_d = _row_blocks(n, d)
    launch(_scatter_rows_kernel, (triton.cdiv(n, block_r), b, triton.cdiv(d, block_d)),
        grad_visible, ids_restore, out, *grad_visible.stride(), *ids_restore.stride(), *out.stride(),
        n, k, d, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


@scatter_rows.register_fake
def _(grad_visible, ids_restore):
    return grad_visible.new_empty((grad_visible.shape[0], ids_restore.shape[1], grad_visible.shape[2]))


def _gather_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _gather_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    return scatter_rows(grad, ids_restore), None, None


gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def topk_visible(scores: Tensor, k: int, tokens: Tensor | None = None):
    """Triton twin of :func:`tgdp.reference.topk_visible.topk_visible` (same contract).

    scores: [B, N] float; tokens: [B, N, D] | None -> (ids_keep [B, k] int64, ids_restore [B, N] int64,
    mask [B, N] fp32, visible [B, k, D] | None). Differentiable in ``tokens`` only.
    """
    check_inputs(scores, k, tokens)
    # Rankings carry no gradient (as in the reference's sort), so the scores enter detached.
    ids_keep, ids_restore, mask = topk_indices(scores.detach(), int(k))
    visible = None if tokens is None else gather_rows(tokens, ids_keep, ids_restore)
    return ids_keep, ids_restore, mask, visible
