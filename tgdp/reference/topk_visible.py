"""Reference top-k visible-token selection (teacher-guided and random masking), plain torch.

Also holds :func:`check_inputs`, the one input validation shared by ``tgdp.ops`` (before dispatch)
and the Triton launchers in ``kernels/topk_visible.py``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["topk_visible", "check_inputs"]


def check_inputs(scores: Tensor, k: int, tokens: Tensor | None) -> None:
    """Raise ValueError/TypeError (naming the shapes) unless the inputs fit :func:`topk_visible`.

    Reads only metadata, so it costs no host sync and traces under compile.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"topk_visible: scores must be a Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"topk_visible: scores must be floating point, got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"topk_visible: scores must be [B, N], got shape {tuple(scores.shape)}")
    b, n = scores.shape
    if b == 0 or n == 0:
        raise ValueError(f"topk_visible: empty scores, shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"topk_visible: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"topk_visible: k={k} must be in [1, N={n}] (scores shape {tuple(scores.shape)})")
    if tokens is not None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"topk_visible: tokens must be a Tensor or None, got {type(tokens).__name__}")
        if tokens.dim() != 3 or tuple(tokens.shape[:2]) != (b, n):
            raise ValueError(f"topk_visible: tokens must be [B, N, D] with B, N = {(b, n)}, got shape "
                             f"{tuple(tokens.shape)} (scores shape {tuple(scores.shape)})")
        if tokens.shape[2] == 0:
            raise ValueError(f"topk_visible: tokens have D=0, shape {tuple(tokens.shape)}")
        if tokens.device != scores.device:
            raise ValueError(f"topk_visible: tokens on {tokens.device} but scores on {scores.device}")


def topk_visible(scores: Tensor, k: int, tokens: Tensor | None = None):
    """Keep the k highest-scoring patches of every row.

    scores: [B, N] (any float dtype; compared in fp32; NaN ranks above everything, as in torch.sort)
    tokens: [B, N, D] or None
    Returns (ids_keep [B, k] int64, ids_restore [B, N] int64, mask [B, N] float32, visible [B, k, D] | None).
    Order: descending score, ties broken by the lower index. ``ids_shuffle = [ids_keep, removed in the
    same order]`` and ``ids_restore = argsort(ids_shuffle)``; mask is 1 for removed, 0 for kept.
    """
    check_inputs(scores, k, tokens)
    b, n = scores.shape
    # Stable descending sort == ties by lower index.
    ids_shuffle = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :k]
    mask = torch.ones(b, n, dtype=torch.float32, device=scores.device)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    visible = None
    if tokens is not None:
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return ids_keep, ids_restore, mask, visible
