"""Batched retrieval metrics vs the official nested-loop formulation (opt-in benchmark).

    pytest benchmarks/bench_retrieval.py            # pytest-benchmark table + ratio in extra_info
    python benchmarks/bench_retrieval.py [N]        # one-shot ratio print-out

The nested-loop formulation is SYNC's ``get_agg_sim_mat(strategy='diagonal_mean')`` (a Python
double loop over video pairs, 16 numpy cosines each) followed by the vectorised numpy
``compute_metrics``, once per direction. At 1,600 videos it takes tens of minutes, so it is timed
on the first ``rows`` query rows (against all 1,600 candidates) and scaled by N / rows; its cost
is exactly linear in the number of query rows. The batched side is the full
:func:`tgdp.eval.retrieval.retrieval_metrics` (both directions, all rows).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from tgdp.eval.retrieval import retrieval_metrics

N, T, D = 1600, 16, 768


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def nested_loop_rows(q: np.ndarray, c: np.ndarray, rows: int) -> np.ndarray:
    """The first ``rows`` rows of the official pairwise diagonal-mean score matrix."""
    n, t, _ = c.shape
    sim = np.empty((rows, n))
    for i in range(rows):
        for j in range(n):
            sim[i, j] = np.mean([_cos(q[i, k], c[j, k]) for k in range(t)])
    return sim


def official_compute_metrics(x: np.ndarray) -> dict:
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    ind = np.where(sx - d == 0)[1]
    return {"R1": np.mean(ind == 0), "R5": np.mean(ind < 5), "R10": np.mean(ind < 10), "MR": np.median(ind) + 1}


def data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, T, D, generator=g)
    v = 0.5 * a + torch.randn(n, T, D, generator=g)
    return a, v


def nested_seconds(a: torch.Tensor, v: torch.Tensor, rows: int) -> float:
    """Extrapolated seconds of the nested-loop formulation, both directions, all N rows."""
    n = a.shape[0]
    an, vn = a.numpy().astype(np.float64), v.numpy().astype(np.float64)
    t0 = time.perf_counter()
    nested_loop_rows(vn, an, rows)           # V->A
    nested_loop_rows(an, vn, rows)           # A->V
    loop = (time.perf_counter() - t0) * n / rows
    # compute_metrics itself is vectorised numpy; time it on a full matrix.
    full = np.random.default_rng(0).standard_normal((n, n))
    t0 = time.perf_counter()
    official_compute_metrics(full)
    official_compute_metrics(full)
    return loop + time.perf_counter() - t0


def batched_seconds(a: torch.Tensor, v: torch.Tensor, repeats: int = 3) -> float:
    retrieval_metrics(a, v, chunk=4096)       # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        retrieval_metrics(a, v, chunk=4096)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("chunk", [512, 4096])
def test_bench_batched_retrieval(benchmark, chunk):
    a, v = data()
    benchmark.extra_info.update(n=N, t=T, d=D, chunk=chunk)
    res = benchmark(retrieval_metrics, a, v, chunk)
    assert res["num_videos"] == N


def test_bench_speed_ratio_vs_nested_loops(benchmark):
    a, v = data()
    rows = 8
    nested = nested_seconds(a, v, rows)
    batched = benchmark.pedantic(retrieval_metrics, args=(a, v, 4096), rounds=3, warmup_rounds=1)
    fast = benchmark.stats.stats.min
    benchmark.extra_info.update(nested_s_extrapolated=nested, batched_s=fast, ratio=nested / fast,
                                nested_rows_timed=rows)
    assert batched["num_videos"] == N


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else N
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    a, v = data(n)
    fast = batched_seconds(a, v)
    slow = nested_seconds(a, v, rows)
    print(f"N={n} T={T} D={D} threads={torch.get_num_threads()}: batched {fast:.3f} s (both directions), "
          f"nested loops {slow:.1f} s (extrapolated from {rows} rows), ratio {slow / fast:.0f}x")
