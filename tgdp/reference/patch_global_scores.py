"""Reference teacher guidance scores from the explicit attention map, plain torch.

Also holds :func:`check_inputs`, the one input validation shared by ``tgdp.ops`` (before dispatch)
and the Triton launcher in ``kernels/patch_global_scores.py``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["attention_lse", "patch_global_scores", "check_inputs", "DIRECTIONS"]

DIRECTIONS = ("patch_to_cls", "cls_to_patch")


def check_inputs(q: Tensor, k: Tensor, lse: Tensor | None, scale: float, global_index: int,
                 direction: str) -> None:
    """Raise ValueError/TypeError (naming the shapes) unless the inputs fit :func:`patch_global_scores`.

    Reads only metadata (shape, dtype, device), so it costs no host sync and traces under compile.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"patch_global_scores: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"patch_global_scores: {name} must be floating point, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"patch_global_scores: {name} must be [B, H, L, d], got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"patch_global_scores: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if q.dtype != k.dtype:
        raise TypeError(f"patch_global_scores: q ({q.dtype}) and k ({k.dtype}) must share a dtype")
    if q.device != k.device:
        raise ValueError(f"patch_global_scores: q on {q.device} but k on {k.device}")
    b, h, l, d = q.shape
    if b == 0 or h == 0 or d == 0:
        raise ValueError(f"patch_global_scores: empty input, q shape {tuple(q.shape)}")
    if l < 2:
        raise ValueError(f"patch_global_scores: need the global token and >= 1 patch, got L={l} "
                         f"(q shape {tuple(q.shape)})")
    if not -l <= global_index < l:
        raise ValueError(f"patch_global_scores: global_index={global_index} out of range for L={l}")
    if direction not in DIRECTIONS:
        raise ValueError(f"patch_global_scores: direction={direction!r} must be one of {DIRECTIONS}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"patch_global_scores: scale must be a number, got {type(scale).__name__}")
    if lse is not None:
        if not isinstance(lse, Tensor) or not lse.is_floating_point():
            raise TypeError(f"patch_global_scores: lse must be a floating Tensor, got "
                            f"{getattr(lse, 'dtype', type(lse).__name__)}")
        if tuple(lse.shape) != (b, h, l):
            raise ValueError(f"patch_global_scores: lse must be [B, H, L] = {(b, h, l)}, got shape "
                             f"{tuple(lse.shape)} (q shape {tuple(q.shape)})")
        if lse.device != q.device:
            raise ValueError(f"patch_global_scores: lse on {lse.device} but q on {q.device}")


def attention_lse(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Row log-sum-exp of the attention logits. q, k: [B, H, L, d] -> [B, H, L] fp32."""
    logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale
    return torch.logsumexp(logits, dim=-1)


def patch_global_scores(q: Tensor, k: Tensor, lse: Tensor | None = None, *, scale: float,
                        global_index: int = 0, renormalize: bool = False,
                        direction: str = "patch_to_cls") -> Tensor:
    """Head-mean attention between every patch and the global (CLS) token.

    q, k: [B, H, L, d] queries/keys of the joint layer, sequence = [CLS, patches] (CLS at
          ``global_index``, normally 0).
    lse:  [B, H, L] softmax log-normaliser of each query row, logits already scaled (None: computed here).
    direction "patch_to_cls": s_i = mean_h softmax(scale q_i K^T)[cls]  (the official CLS-key column);
              "cls_to_patch": s_i = mean_h softmax(scale q_cls K^T)[i]  (the CLS-query row).
    Returns [B, L-1] fp32 over the patches (the global token removed); optionally divided by
    its sum over patches.
    """
    check_inputs(q, k, lse, scale, global_index, direction)
    scale = float(scale)
    global_index = global_index % q.shape[2]
    if lse is None:
        lse = attention_lse(q, k, scale)
    qf, kf, lse = q.float(), k.float(), lse.float()
    if direction == "patch_to_cls":
        logit = torch.einsum("bhid,bhd->bhi", qf, kf[:, :, global_index]) * scale  # [B, H, L]
        p = torch.exp(logit - lse)
    else:
        logit = torch.einsum("bhd,bhjd->bhj", qf[:, :, global_index], kf) * scale
        p = torch.exp(logit - lse[:, :, global_index : global_index + 1])
    s = p.mean(dim=1)
    s = torch.cat([s[:, :global_index], s[:, global_index + 1 :]], dim=1)
    if renormalize:
        s = s / s.sum(dim=1, keepdim=True)
    return s
