"""Attention backends of the fast model, over packed variable-length sequences.

Tokens of many sequences are packed into one ``[total, H, d]`` tensor; sequence boundaries live in
``cu_seqlens`` (a device tensor, built once per layout, see :mod:`tgdp.model.packing`). Three
backends compute the same thing:

- ``"flash"``: FlashAttention's ``flash_attn_varlen_func`` (the Hopper ``flash_attn_interface``
  build first, then FA2), one kernel over all sequences; it also returns the softmax log-sum-exp
  that :func:`tgdp.ops.patch_global_scores` reuses, so the teacher never materialises a map.
  CUDA and fp16/bf16 only; other calls fall through to SDPA.
- ``"sdpa"``: ``F.scaled_dot_product_attention`` per *segment group* (consecutive sequences of
  the same length, batched as ``[count, H, L, d]``). In this model every view of a modality has
  one fixed length per mask ratio, so a group is a whole view and there are 1-3 SDPA calls per
  layer. On CPU the log-sum-exp comes from the CPU flash kernel that SDPA itself dispatches to.
- ``"math"``: the explicit softmax, for checks.

The backend is resolved once (:func:`resolve_backend`) from ``model.attn_backend`` and the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SegmentGroup", "VarlenMeta", "flash_varlen_func", "resolve_backend", "varlen_attention"]

BACKENDS = ("auto", "flash", "sdpa", "math")


@dataclass(frozen=True)
class SegmentGroup:
    """``count`` consecutive sequences of ``length`` tokens each, starting at packed row ``start``."""

    start: int
    count: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.count * self.length


@dataclass(frozen=True, eq=False)
class VarlenMeta:
    """Boundaries of a packed batch.

    cu_seqlens: [S + 1] int32 on the tokens' device (prefix sums of the sequence lengths; what
    FlashAttention reads). groups: the same boundaries as Python ints (static per layout, so the
    CPU path slices without reading the device tensor: no host sync). max_seqlen: longest sequence.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    groups: tuple[SegmentGroup, ...]

    @property
    def total(self) -> int:
        return self.groups[-1].stop if self.groups else 0


@functools.lru_cache(maxsize=1)
def flash_varlen_func():
    """FlashAttention's varlen function, or None when no build is importable (always on CPU boxes)."""
    try:
        from flash_attn_interface import flash_attn_varlen_func  # Hopper (FA3) build
        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func  # FA2
        return flash_attn_varlen_func
    except ImportError:
        return None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Pick the backend once: ``auto`` = flash when importable and on CUDA, else sdpa.

    An explicit ``"flash"`` that cannot run here raises instead of silently degrading.
    """
    if name not in BACKENDS:
        raise ValueError(f"attn_backend={name!r} must be one of {list(BACKENDS)}")
    is_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "flash" if is_cuda and flash_varlen_func() is not None else "sdpa"
    if name == "flash" and not (is_cuda and flash_varlen_func() is not None):
        raise ValueError(f"attn_backend='flash' needs CUDA tensors and flash-attn; device={device}, "
                         f"flash-attn importable={flash_varlen_func() is not None}")
    return name


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, *, scale: float,
                     backend: str = "sdpa", return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
    """Non-causal attention of every packed sequence with itself.

    q, k, v: [total, H, d] (same layout; sequences back to back as in ``meta``).
    Returns (out [total, H, d], lse [H, total] or None). ``lse`` (fp32; fp64 for fp64 inputs) is the
    log-sum-exp of each query row's scaled logits; it is returned when ``return_lse`` and the backend
    has it for free (flash, math, CPU sdpa), otherwise None (the caller recomputes it where needed).
    ``backend="flash"`` with fp32 or CPU tensors runs the SDPA path (FlashAttention is fp16/bf16 only).
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [total, H, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] != meta.total:
        raise ValueError(f"packed length {q.shape[0]} != layout total {meta.total}")
    if backend == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v, meta, scale, return_lse)
    if backend not in ("flash", "sdpa", "math"):
        raise ValueError(f"backend={backend!r} must be 'flash', 'sdpa' or 'math'")
    outs, lses = [], []
    for g in meta.groups:
        # [count*L, H, d] -> [count, H, L, d]: a view of contiguous rows, no copy until SDPA.
        qg, kg, vg = (t[g.start:g.stop].unflatten(0, (g.count, g.length)).transpose(1, 2)
                      for t in (q, k, v))
        if backend == "math":
            o, lse = _math(qg, kg, vg, scale)
        else:
            o, lse = _sdpa(qg, kg, vg, scale, return_lse)
        outs.append(o.transpose(1, 2).flatten(0, 1))
        if lse is not None:
            lses.append(lse.transpose(0, 1).flatten(1))  # [count, H, L] -> [H, count*L]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    lse_all = None
    if return_lse and len(lses) == len(meta.groups):
        lse_all = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
    return out, lse_all


def _lse_dtype(x: Tensor) -> torch.dtype:
    """The lse is kept in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _math(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Explicit softmax attention. q, k, v: [B, H, L, d] -> ([B, H, L, d], lse [B, H, L] >= fp32)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(logits.to(_lse_dtype(q)), dim=-1)
    return logits.softmax(dim=-1) @ v, lse


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """SDPA on [B, H, L, d]. With ``return_lse`` on CPU, call the CPU flash kernel SDPA would pick
    anyway (it is differentiable and returns the row log-sum-exp)."""
    if return_lse and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.to(_lse_dtype(q))
    if return_lse and q.device.type == "meta":
        # FLOP counting on the meta device: SDPA decomposes into the same two matmuls there anyway.
        return _math(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def _flash(q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, scale: float,
           return_lse: bool) -> tuple[Tensor, Tensor | None]:
    fn = flash_varlen_func()
    if fn is None:
        raise RuntimeError("backend='flash' but flash-attn is not importable")
    cu = meta.cu_seqlens
    res = fn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, softmax_scale=scale, causal=False,
             return_attn_probs=return_lse)
    # FA2 returns (out, lse, S_dmask) and FA3 (out, lse) with return_attn_probs; some FA3 betas always
    # return a tuple. The varlen lse is [H, total] in both.
    if isinstance(res, tuple):
        out, lse = res[0], res[1]
    else:
        out, lse = res, None
    if lse is not None and tuple(lse.shape) != (q.shape[1], q.shape[0]):
        lse = None  # old FA2 builds pad the lse to [S, H, max_seqlen]: let the caller recompute it
    return out, (lse.float() if return_lse and lse is not None else None)
