"""Fused teacher guidance scores: head-mean softmax attention between patches and the global token.

The reference builds the [B, H, L, L] attention map; these kernels never do. With ``lse`` (the row
log-normaliser an attention forward such as FlashAttention already returns) one pass reads q and the
CLS key only. Without it, each query block streams over the keys once with an online softmax (running
max and sum in registers), so the only buffers are q/k tiles and the [B, L-1] fp32 output.

Forward only: the teacher has no gradient, so the public function detaches its inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tgdp.kernels import INTERPRET, interpreter_blocks, launch, next_pow2
from tgdp.reference.patch_global_scores import check_inputs

__all__ = ["patch_global_scores"]


@triton.jit
def _patch_to_cls_kernel(
    Q_ptr, K_ptr, LSE_ptr, OUT_ptr,                    # q, k: [B, H, L, d]; lse: [B, H, L]; out: [B, L-1]
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_lb, stride_lh, stride_ll,
    stride_ob, stride_ol,
    H, L, D, G, scale,
    HAS_LSE: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, i'] = mean_h exp(scale q_i . k_G - lse_i) for the query block of program (pid_m, b)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(0, H):
        q_base = Q_ptr + b * stride_qb + h * stride_qh
        k_base = K_ptr + b * stride_kb + h * stride_kh
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        k_g = tl.load(k_base + G * stride_kl + offs_d * stride_kd, mask=d_valid, other=0.0)
        # The CLS logit as an fp32 row-dot (same numerics as the fp32 reference einsum).
        logit = tl.sum(q.to(tl.float32) * k_g.to(tl.float32)[None, :], axis=1) * scale
        if HAS_LSE:
            lse = tl.load(LSE_ptr + b * stride_lb + h * stride_lh + offs_m * stride_ll,
                          mask=m_valid, other=0.0).to(tl.float32)
        else:
            # Online softmax over key blocks: only the running max/sum per row are kept.
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for n0 in range(0, L, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_valid = offs_n < L
                kt = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                             mask=d_valid[:, None] & n_valid[None, :], other=0.0)   # [BLOCK_D, BLOCK_N]
                if UPCAST_DOT:
                    s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
                else:
                    s = tl.dot(q, kt)                  # bf16/fp16 operands, fp32 accumulation
                s = tl.where(n_valid[None, :], s * scale, float("-inf"))
                # Key 0 is in the first block, so m_new is finite from the start: no inf - inf.
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
                m_i = m_new
            lse = m_i + tl.log(l_i)
        acc += tl.exp(logit - lse)
    col = tl.where(offs_m < G, offs_m, offs_m - 1)           # drop the global token's own column
    tl.store(OUT_ptr + b * stride_ob + col * stride_ol, acc / H, mask=m_valid & (offs_m != G))


@triton.jit
def _cls_to_patch_kernel(
    Q_ptr, K_ptr, LSE_ptr, OUT_ptr,                    # q, k: [B, H, L, d]; lse: [B, H, L]; out: [B, L-1]
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_lb, stride_lh, stride_ll,
    stride_ob, stride_ol,
    H, L, D, G, scale,
    HAS_LSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, j'] = mean_h exp(scale q_G . k_j - lse_G) for the key block of program (pid_n, b)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < L
    d_valid = offs_d < D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(0, H):
        q_base = Q_ptr + b * stride_qb + h * stride_qh
        k_base = K_ptr + b * stride_kb + h * stride_kh
        q_g = tl.load(q_base + G * stride_ql + offs_d * stride_qd, mask=d_valid, other=0.0).to(tl.float32)
        kb = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                     mask=n_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        logit = tl.sum(kb * q_g[None, :], axis=1) * scale
        if HAS_LSE:
            lse = tl.load(LSE_ptr + b * stride_lb + h * stride_lh + G * stride_ll).to(tl.float32)
        else:
            # One query row: stream all keys with a scalar online max/sum (a re-read of K per
            # program, cheap next to never building the L x L map).
            m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), axis=0)
            l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
            for n0 in range(0, L, BLOCK_N):
                offs_j = n0 + tl.arange(0, BLOCK_N)
                j_valid = offs_j < L
                kj = tl.load(k_base + offs_j[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                             mask=j_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
                s = tl.where(j_valid, tl.sum(kj * q_g[None, :], axis=1) * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
                m_i = m_new
            lse = m_i + tl.log(l_i)
        acc += tl.exp(logit - lse)
    col = tl.where(offs_n < G, offs_n, offs_n - 1)
    tl.store(OUT_ptr + b * stride_ob + col * stride_ol, acc / H, mask=n_valid & (offs_n != G))


def _patch_to_cls_blocks(l: int, dtype: torch.dtype, has_lse: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the patch -> CLS kernel.

    Interpreter: one program per batch row (each program is a Python call). GPU: 64 x 64 tiles on 4
    warps, except fp32 without lse, whose ieee-fp32 ``tl.dot`` runs on FMA units and keeps both
    operands in registers: at 64 x 64 it spills on sm_90 (255 registers + 648 bytes of stack), at
    32 x 32 over 8 warps it needs 67 registers and no stack (``python -m tgdp.kernels.aot``).
    """
    if interpreter_blocks():
        block = max(16, min(next_pow2(l), 256))
        return block, block, 4
    if dtype == torch.float32 and not has_lse:
        return 32, 32, 8
    return 64, 64, 4


def _launch(q: Tensor, k: Tensor, lse: Tensor | None, scale: float, global_index: int,
            direction: str) -> Tensor:
    """q, k: [B, H, L, d] (any strides); lse: [B, H, L] | None -> [B, L-1] fp32."""
    check_inputs(q, k, lse, scale, global_index, direction)
    b, h, l, d = q.shape
    g = global_index % l
    out = torch.empty(b, l - 1, dtype=torch.float32, device=q.device)
    has_lse = lse is not None
    lse_arg = lse if has_lse else out           # dummy pointer, never read when HAS_LSE is False
    lse_strides = lse.stride() if has_lse else (0, 0, 0)
    block_d = max(16, next_pow2(d))
    common = (q, k, lse_arg, out, *q.stride(), *k.stride(), *lse_strides, *out.stride(),
              h, l, d, g, float(scale))
    if direction == "patch_to_cls":
        block_m, block_n, warps = _patch_to_cls_blocks(l, q.dtype, has_lse)
        launch(_patch_to_cls_kernel, (triton.cdiv(l, block_m), b), *common, HAS_LSE=has_lse,
               UPCAST_DOT=INTERPRET or q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
               BLOCK_D=block_d, num_warps=warps)
    else:
        block_n = max(16, min(next_pow2(l), 256)) if interpreter_blocks() else 64
        launch(_cls_to_patch_kernel, (triton.cdiv(l, block_n), b), *common, HAS_LSE=has_lse,
               BLOCK_N=block_n, BLOCK_D=block_d)
    return out


@torch.library.custom_op("tgdp::patch_global_scores", mutates_args=())
def _patch_global_scores_op(q: Tensor, k: Tensor, lse: Tensor | None, scale: float, global_index: int,
                            renormalize: bool, direction: str) -> Tensor:
    s = _launch(q, k, lse, scale, global_index, direction)
    return s / s.sum(dim=1, keepdim=True) if renormalize else s


@_patch_global_scores_op.register_fake
def _(q, k, lse, scale, global_index, renormalize, direction):
    return q.new_empty((q.shape[0], q.shape[2] - 1), dtype=torch.float32)


def patch_global_scores(q: Tensor, k: Tensor, lse: Tensor | None = None, *, scale: float,
                        global_index: int = 0, renormalize: bool = False,
                        direction: str = "patch_to_cls") -> Tensor:
    """Triton twin of :func:`tgdp.reference.patch_global_scores.patch_global_scores` (same contract).

    q, k: [B, H, L, d]; lse: [B, H, L] | None -> [B, L-1] fp32 (no grad: forward only).
    """
    check_inputs(q, k, lse, scale, global_index, direction)
    return _patch_global_scores_op(q.detach(), k.detach(), None if lse is None else lse.detach(),
                                   float(scale), int(global_index), bool(renormalize), direction)
