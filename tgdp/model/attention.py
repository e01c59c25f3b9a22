"""Attention backends of the fast model, over packed variable-length sequences.

Tokens of many sequences are packed into one ``[total, H, d]`` tensor; sequence boundaries live in
``cu_seqlens`` (a device tensor, built once per layout, see :mod:`tgdp.model.packing`). Three
backends compute the same thing:

- ``"flash"``: FlashAttention's ``flash_attn_varlen_func`` (the Hopper ``flash_attn_interface``
  build first, then FA2), one kernel over all sequences; it also returns the softmax log-sum-exp
  that :func:`tgdp.ops.patch_global_scores` reuses, so the teacher never materialises a map.
  CUDA and fp16/bf16 only; other calls fall through to SDPA. Every released calling convention
  is handled (:func:`_flash`; tests/test_flash_api.py checks each against fakes with the real
  signatures).
- ``"sdpa"``: ``F.scaled_dot_product_attention`` per *segment group* (consecutive sequences of
  the same length, batched as ``[count, H, L, d]``). In this model every view of a modality has
  one fixed length per mask ratio, so a group is a whole view and there are 1-3 SDPA calls per
  layer. On CPU the log-sum-exp comes from the CPU flash kernel that SDPA itself dispatches to.
- ``"math"``: the explicit softmax, for checks.

The backend is resolved once (:func:`resolve_backend`) from ``model.attn_backend`` and the device.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SegmentGroup", "VarlenMeta", "FlashAPI", "flash_api", "flash_varlen_func", "resolve_backend",
           "varlen_attention"]

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


@dataclass(frozen=True)
class FlashAPI:
    """The importable FlashAttention varlen function and how to call it (see the conventions above :func:`_flash`)."""

    fn: Callable
    module: str            # "flash_attn_interface" (FA3, Hopper) or "flash_attn" (FA2)
    version: str           # the package's __version__ ("" if it has none)
    takes_return_attn_probs: bool   # FA2; FA3 from upstream commit 203b9b3d (2025-08-29)


# A plain dict, not functools.lru_cache: once filled, a compiled forward reads it as a constant
# (Dynamo re-runs the body of an lru_cache'd function while tracing).
_FLASH: dict[str, FlashAPI | None] = {}


def flash_api() -> FlashAPI | None:
    """The FlashAttention build to use (FA3 first, then FA2), found once; None when neither imports
    (always on CPU boxes)."""
    if "api" not in _FLASH:
        _FLASH["api"] = _find_flash()
    return _FLASH["api"]


def _find_flash() -> FlashAPI | None:
    for module in ("flash_attn_interface", "flash_attn"):   # Hopper (FA3) build, then FA2
        try:
            mod = importlib.import_module(module)
            fn = mod.flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
        version = str(getattr(mod, "__version__", ""))
        try:
            takes = "return_attn_probs" in inspect.signature(fn).parameters
        except (TypeError, ValueError):   # not introspectable: do not pass the keyword
            takes = False
        return FlashAPI(fn, module, version, takes)
    return None


def flash_varlen_func():
    """FlashAttention's varlen function, or None when no build is importable."""
    api = flash_api()
    return None if api is None else api.fn


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
    if backend == "flash" and _flash_runs(q):
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


def _flash_runs(q: Tensor) -> bool:
    """FlashAttention takes CUDA fp16/bf16 tensors only (a test may widen this for a CPU fake)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


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


# FlashAttention's varlen calling conventions (source read from the flash-attn sdists 2.5.9.post1
# and 2.8.3.post2, `pip download --no-deps flash-attn==…`, and from Dao-AILab/flash-attention):
#
# - FA2 (``flash_attn``), every 2.x: ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k,
#   max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, ...,
#   return_attn_probs=False, ...)``; returns ``out``, or ``(out, softmax_lse, S_dmask)`` with
#   return_attn_probs (S_dmask is None unless dropout_p > 0). The varlen softmax_lse is
#   *padded* ``[num_seqs, H, max_seqlen_q]`` fp32 up to 2.5.x (2.5.9.post1: flash_api.cpp allocates
#   {batch_size, num_heads, max_seqlen_q}; rows past a sequence's length are not written) and
#   ``[H, total_q]`` from 2.6.0 (upstream PR #970, "Support unpadded LSE layout"). Custom-op
#   registration (torch.compile traces it) arrived in 2.7.
# - FA3 (Hopper ``flash_attn_interface``), three generations:
#   (a) 2024 betas: no ``return_attn_probs`` parameter, always return ``(out, softmax_lse)``;
#   (b) 2025 builds up to upstream commit 203b9b3d (2025-08-29; e.g. the hopper/ folder of the
#       2.8.3.post2 sdist): no ``return_attn_probs`` parameter (passing it raises TypeError) and
#       return ``out`` only, so no LSE is available;
#   (c) from 203b9b3d: ``return_attn_probs=False`` as the last parameter; returns ``out``, or
#       ``(out, softmax_lse)`` with it. FA3's varlen softmax_lse is ``[H, total_q]`` fp32.


def _unpad_lse(lse: Tensor, meta: VarlenMeta, heads: int) -> Tensor:
    """FA2 < 2.6 padded lse [S, H, max_seqlen] -> [H, total] (the rows of each sequence, packed)."""
    parts, seq = [], 0
    for g in meta.groups:   # Python ints: slicing reads no device value
        parts.append(lse[seq:seq + g.count, :, :g.length].transpose(0, 1).reshape(heads, g.count * g.length))
        seq += g.count
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _flash(q: Tensor, k: Tensor, v: Tensor, meta: VarlenMeta, scale: float,
           return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """FlashAttention varlen over ``meta``'s sequences. Returns (out [total, H, d], lse [H, total] fp32
    or None); None with ``return_lse`` only for FA3 builds that return no lse (the caller recomputes)."""
    api = flash_api()
    if api is None:
        raise RuntimeError("backend='flash' but flash-attn is not importable")
    cu = meta.cu_seqlens
    kwargs = dict(softmax_scale=scale, causal=False)
    if api.takes_return_attn_probs:   # FA2, FA3 >= 203b9b3d; older FA3 builds reject the keyword
        kwargs["return_attn_probs"] = return_lse
    res = api.fn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, **kwargs)
    # FA2: out | (out, lse, S_dmask); FA3 (a): (out, lse); (b): out; (c): out | (out, lse)
    out, lse = (res[0], res[1]) if isinstance(res, (tuple, list)) else (res, None)
    if not return_lse or lse is None:
        return out, None
    total, heads = q.shape[0], q.shape[1]
    if lse.dim() == 3 and lse.shape[0] == cu.shape[0] - 1 and lse.shape[1] == heads:
        lse = _unpad_lse(lse, meta, heads)      # FA2 < 2.6
    elif tuple(lse.shape) != (heads, total):
        raise RuntimeError(f"flash-attn returned a softmax lse of shape {tuple(lse.shape)}; expected "
                           f"[H, total] = ({heads}, {total}) or padded [{cu.shape[0] - 1}, {heads}, max_seqlen]")
    return out, lse.float()
