"""Exact t-SNE in torch (van der Maaten & Hinton, 2008) for the embedding plots.

scikit-learn is not a dependency, and the plots need at most a few thousand points, so the exact
O(N^2) algorithm is enough: Gaussian input affinities with a per-point bandwidth found by
bisection to match the perplexity, symmetrised; Student-t output affinities; gradient descent
with momentum, per-parameter gains and early exaggeration. fp64 throughout (small N, and the
affinities span many orders of magnitude).
"""

from __future__ import annotations

import math

import torch

__all__ = ["tsne"]


def _conditional_p(d2: torch.Tensor, perplexity: float, steps: int = 64) -> torch.Tensor:
    """Row-stochastic P [N, N] whose rows have entropy log(perplexity). d2: [N, N] squared distances."""
    n = d2.shape[0]
    target = math.log(perplexity)
    eye = torch.eye(n, dtype=torch.bool, device=d2.device)
    # Bisection on log(beta) for every row at once; distances shifted by the row minimum for
    # numerical range (the shift cancels in the normalisation).
    d = d2 - d2.masked_fill(eye, float("inf")).min(1, keepdim=True).values
    lo = torch.full((n, 1), -50.0, dtype=d2.dtype, device=d2.device)
    hi = torch.full((n, 1), 50.0, dtype=d2.dtype, device=d2.device)
    for _ in range(steps):
        mid = (lo + hi) / 2
        logits = (-d * mid.exp()).masked_fill(eye, float("-inf"))
        p = torch.softmax(logits, dim=1)
        h = -(p * torch.log(p.clamp_min(1e-300))).sum(1, keepdim=True)
        too_flat = h > target                 # entropy too high -> larger beta (narrower kernel)
        lo = torch.where(too_flat, mid, lo)
        hi = torch.where(too_flat, hi, mid)
    return torch.softmax((-d * ((lo + hi) / 2).exp()).masked_fill(eye, float("-inf")), dim=1)


def tsne(x: torch.Tensor, dim: int = 2, perplexity: float = 30.0, iters: int = 1000, seed: int = 0,
         exaggeration: float = 12.0, exaggeration_iters: int = 250) -> torch.Tensor:
    """Embed x: [N, D] (N >= 3) into [N, dim] fp32 (on x's device).

    ``perplexity`` must be < N - 1 (the effective number of neighbours). Raises ValueError on
    non-finite input or bad sizes.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"t-SNE input must be a [N, D] tensor, got {getattr(x, 'shape', type(x))}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    if not 1.0 <= perplexity < n - 1:
        raise ValueError(f"perplexity={perplexity} must be in [1, N-1) with N={n} points")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("t-SNE input contains NaN/Inf")
    if dim < 1 or iters < 1:
        raise ValueError(f"dim={dim} and iters={iters} must be >= 1")
    xd = x.detach().double()
    d2 = torch.cdist(xd, xd).square()
    p = _conditional_p(d2, perplexity)
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    y = (torch.randn(n, dim, generator=gen, dtype=torch.float64) * 1e-4).to(x.device)
    vel = torch.zeros_like(y)
    gains = torch.ones_like(y)
    lr = max(n / exaggeration / 4.0, 50.0)          # the "auto" rate of Belkina et al. (2019)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    for it in range(iters):
        exag = exaggeration if it < exaggeration_iters else 1.0
        momentum = 0.5 if it < exaggeration_iters else 0.8
        num = (1.0 / (1.0 + torch.cdist(y, y).square())).masked_fill(eye, 0.0)   # [N, N]
        q = (num / num.sum()).clamp_min(1e-12)
        w = (exag * p - q) * num
        grad = 4.0 * (w.sum(1, keepdim=True) * y - w @ y)     # dC/dy_i = 4 sum_j w_ij (y_i - y_j)
        same_sign = (grad > 0) == (vel > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)
        vel = momentum * vel - lr * gains * grad
        y = y + vel
        y = y - y.mean(0)
    return y.float()
