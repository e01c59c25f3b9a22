"""Statistics of an ablation: mean ± std over seeds and the paired t-interval against the baseline.

Paired over seeds: seed ``s`` of every variant starts from the same initial weights and sees the
same data order, reconstruction masks and held-out clips, so the per-seed differences
``d_s = m(variant, s) − m(baseline, s)`` remove what the seeds share. With ``n`` seeds,

    d̄ = mean(d_s),   s_d = std(d_s, ddof=1),   half-width = t_{0.975, n−1} · s_d / √n,

and the 95 % confidence interval of the mean difference is ``d̄ ± half-width`` (Student t, which
assumes the per-seed differences are roughly normal; with 3–5 seeds nothing better is available).
The interval describes variation over training seeds on *this* held-out split; the sampling error
of the split itself is not in it.

No scipy: the t quantile comes from the regularised incomplete beta function (continued fraction)
and bisection, accurate to ~1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["betainc", "t_cdf", "t_quantile", "mean_std", "paired_ci"]


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        # even step: d_{2m} = m (b − m) x / ((a + 2m − 1)(a + 2m))
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # odd step: d_{2m+1} = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0, x in [0, 1]."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs x in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))   # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`), e.g. t_quantile(0.975, 2) = 4.3027."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std" (ddof 1; None for one value), "n", "values"}``."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": v}


def paired_ci(variant: dict[int, float], baseline: dict[int, float], level: float = 0.95,
              resolve: float = 3.0) -> dict:
    """Paired t-interval of ``mean(variant − baseline)`` over the seeds both have.

    variant, baseline: seed -> metric. Returns ``{"n", "seeds", "diffs", "mean", "std", "t",
    "half_width", "low", "high", "level", "excludes_zero", "resolves"}``; ``resolves`` = the
    half-width is below ``resolve`` (a true difference of that size would be told from zero).
    With fewer than 2 shared seeds the interval fields are None.
    """
    seeds = sorted(set(variant) & set(baseline))
    diffs = [float(variant[s]) - float(baseline[s]) for s in seeds]
    ms = mean_std(diffs)
    out = {"n": ms["n"], "seeds": seeds, "diffs": diffs, "mean": ms["mean"], "std": ms["std"], "t": None,
           "half_width": None, "low": None, "high": None, "level": level, "excludes_zero": None,
           "resolves": None, "resolve_threshold": resolve}
    if ms["n"] < 2:
        return out
    t = t_quantile(0.5 + level / 2.0, ms["n"] - 1)
    hw = t * ms["std"] / math.sqrt(ms["n"])
    out.update(t=t, half_width=hw, low=ms["mean"] - hw, high=ms["mean"] + hw,
               excludes_zero=bool(ms["mean"] - hw > 0 or ms["mean"] + hw < 0), resolves=bool(hw < resolve))
    return out
