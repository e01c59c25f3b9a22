"""Masks for the two student paths (spec §2).

All masks are ``Masks`` (ids_keep / ids_restore / mask, 1 = removed) built through
:func:`tgdp.ops.topk_visible`, so random and teacher-guided masking share one code path:
random masking is the top-k of ``-u`` with ``u ~ U[0, 1)`` from an explicit generator, which keeps
the same tokens in the same order as the official ``argsort(noise)[:k]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tgdp import ops

__all__ = ["Masks", "num_keep", "random_masks", "guided_masks", "official_compat_ranks"]


@dataclass(frozen=True)
class Masks:
    """ids_keep: [B, k] int64 (keep order); ids_restore: [B, N] int64; mask: [B, N] float32, 1 = removed."""

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]


def num_keep(n: int, ratio: float) -> int:
    """Kept tokens for a mask ratio, as the official code computes it: floor(N * (1 - ratio))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio={ratio!r} must be in [0, 1)")
    return max(1, int(n * (1 - ratio)))


def _from_scores(scores: Tensor, k: int) -> Masks:
    ids_keep, ids_restore, mask, _ = ops.topk_visible(scores, k)
    return Masks(ids_keep, ids_restore, mask)


def random_masks(batch: int, n: int, ratio: float, generator: torch.Generator,
                 device: torch.device | str | None = None) -> Masks:
    """Uniform random masking; ``generator`` must live on ``device``."""
    noise = torch.rand(batch, n, generator=generator, device=device)
    return _from_scores(-noise, num_keep(n, ratio))


def guided_masks(scores: Tensor, ratio: float, mode: str, generator: torch.Generator,
                 gumbel_tau: float = 1.0) -> Masks:
    """Teacher-guided masking of the contrastive path.

    scores: [B, N] teacher patch scores in patch-index (unshuffled) order.
    mode "distinct": keep the top-k scores; "gumbel": top-k of log(softmax(scores / tau)) + Gumbel
    noise (sampling k patches without replacement proportionally to softmax(scores / tau));
    "random": ignore the scores.
    """
    b, n = scores.shape
    k = num_keep(n, ratio)
    if mode == "distinct":
        return _from_scores(scores, k)
    if mode == "gumbel":
        logp = torch.log_softmax(scores.float() / gumbel_tau, dim=1)
        u = torch.rand(b, n, generator=generator, device=scores.device).clamp_(1e-12, 1 - 1e-12)
        return _from_scores(logp - torch.log(-torch.log(u)), k)
    if mode == "random":
        return random_masks(b, n, ratio, generator, scores.device)
    raise ValueError(f"guide mode={mode!r} must be 'distinct', 'gumbel' or 'random'")


def official_compat_ranks(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Reproduce the official bug (spec §2.3): the teacher ran on a randomly *shuffled* sequence and its
    ranks index that shuffled order, yet were used as patch indices.

    Returns scores re-indexed so that top-k over them selects the official (wrong) patches:
    the value at patch j is the score of the patch that sat at position j of a random permutation.
    """
    b, n = scores.shape
    perm = torch.argsort(torch.rand(b, n, generator=generator, device=scores.device), dim=1)
    return torch.gather(scores, 1, perm)
