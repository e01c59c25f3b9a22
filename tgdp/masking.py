"""Masks for the two student paths (spec §2).

All masks are ``Masks`` (ids_keep / ids_restore / mask, 1 = removed) built through
:func:`tgdp.ops.topk_visible`, so random and teacher-guided masking share one code path:
random masking is the top-k of ``-u`` with ``u ~ U[0, 1)`` from an explicit generator, which keeps
the same tokens in the same order as the official ``argsort(noise)[:k]``.

Every random draw can also be made by the caller and passed in (``noise=``): a ``torch.Generator``
inside a ``torch.compile`` region is a graph break, so the training step draws its uniforms
eagerly (:meth:`tgdp.method.TGDP.draw_noise`) and the compiled forward only consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tgdp import ops

__all__ = ["Masks", "num_keep", "random_masks", "uniform_masks", "guided_masks", "official_compat_ranks"]


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
    return uniform_masks(torch.rand(batch, n, generator=generator, device=device), ratio)


def uniform_masks(noise: Tensor, ratio: float) -> Masks:
    """Random masking from given draws: noise [B, N] ~ U[0, 1) (the same masks as :func:`random_masks`
    with a generator that draws ``noise``)."""
    return _from_scores(-noise, num_keep(noise.shape[1], ratio))


def _uniform(b: int, n: int, generator: torch.Generator | None, noise: Tensor | None, device) -> Tensor:
    if noise is not None:
        if tuple(noise.shape) != (b, n):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({b}, {n})")
        return noise
    if generator is None:
        raise ValueError("a torch.Generator or precomputed noise [B, N] is needed for this random draw")
    return torch.rand(b, n, generator=generator, device=device)


GUMBEL_EPS = 1e-12   # the official get_patch2cls_rank's eps (probabilities and uniforms are clamped by it)


def guided_masks(scores: Tensor, ratio: float, mode: str, generator: torch.Generator | None = None,
                 gumbel_tau: float = 1.0, *, noise: Tensor | None = None) -> Masks:
    """Teacher-guided masking of the contrastive path.

    scores: [B, N] teacher patch scores in patch-index (unshuffled) order.
    mode "distinct": keep the top-k scores (the paper's deterministic selection; invariant to a
    positive per-row scale, so renormalised scores select the same patches);
    "gumbel": the official ``prob`` mode (``get_patch2cls_rank``) on the RAW head-mean scores ``s``:
    ``p = softmax(s / max(tau, eps))``, ``u ~ U[0, 1)`` clamped to ``[eps, 1 - eps]``, keep the top-k
    of ``log(max(p, eps)) - log(-log(u))`` (k patches sampled without replacement in proportion to
    ``p``); the caller must pass raw scores, as a row scale changes ``p``;
    "random": ignore the scores.
    noise: [B, N] U[0, 1) draws to use instead of drawing from ``generator`` (gumbel, random).
    """
    b, n = scores.shape
    k = num_keep(n, ratio)
    if mode == "distinct":
        return _from_scores(scores, k)
    if mode == "gumbel":
        probs = torch.softmax(scores.float() / max(gumbel_tau, GUMBEL_EPS), dim=1)
        u = _uniform(b, n, generator, noise, scores.device).clamp(GUMBEL_EPS, 1 - GUMBEL_EPS)
        return _from_scores(torch.log(probs.clamp(min=GUMBEL_EPS)) - torch.log(-torch.log(u)), k)
    if mode == "random":
        return uniform_masks(_uniform(b, n, generator, noise, scores.device), ratio)
    raise ValueError(f"guide mode={mode!r} must be 'distinct', 'gumbel' or 'random'")


def official_compat_ranks(scores: Tensor, generator: torch.Generator | None = None, *,
                          noise: Tensor | None = None) -> Tensor:
    """Reproduce the official bug (spec §2.3): the teacher ran on a randomly *shuffled* sequence and its
    ranks index that shuffled order, yet were used as patch indices.

    Returns scores re-indexed so that top-k over them selects the official (wrong) patches:
    the value at patch j is the score of the patch that sat at position j of a random permutation
    (``argsort`` of ``noise`` [B, N] ~ U[0, 1), or of a draw from ``generator``).
    """
    b, n = scores.shape
    perm = torch.argsort(_uniform(b, n, generator, noise, scores.device), dim=1)
    return torch.gather(scores, 1, perm)
