"""Zero-shot audio-visual retrieval metrics in batched, row-chunked tensor form (spec §6).

Per video ``i`` we hold ``T`` (= 16) per-frame global embeddings per modality, ``a[i]`` and
``v[i]`` of shape ``[T, D]``. After L2 normalisation in fp32, the score of a query ``i`` and a
candidate ``j`` is the mean of the ``T`` aligned frame-pair cosines::

    S[i, j] = (1/T) * sum_k <q[i, k], c[j, k]>      = (q_flat @ c_flat.T / T)[i, j]

computed as one flattened ``[N, T*D]`` matmul in fp32 with 'highest' precision (no TF32), as the
official ``diag_mean_cosine``. Directions: ``v2a`` (V->A) = video queries against audio
candidates; ``a2v`` (A->V) = audio queries against video candidates. Candidate ``i`` is the
correct match of query ``i``.

Rank and tie semantics (``ties="official"``, the default). The official ``compute_metrics`` sorts
each row descending and collects every position whose sorted score equals the diagonal score
*exactly*. A row whose diagonal score is tied with ``t - 1`` other candidates therefore yields
``t`` entries, the ranks ``g, g+1, ..., g+t-1`` where ``g`` is the number of scores strictly
greater than the diagonal; all entries of all rows are pooled, so the denominator of R@K and the
median is the number of entries, not the number of queries. We reproduce exactly that from two
counts per row (``g`` and ``t``) without sorting or materialising the entries:

- R@K = 100 * sum_i |[g_i, g_i + t_i) ∩ [0, K)| / sum_i t_i  (percent; official reports fractions)
- MR  = median(pooled entries) + 1, with numpy's median (mean of the two middle entries when
  their number is even), found from the histogram of entries.

Cleaner alternatives, one entry per query (denominator N): ``ties="optimistic"`` (rank = g, a
tie counts in the query's favour) and ``ties="pessimistic"`` (rank = g + t - 1).

Memory: only ``chunk`` rows of ``S`` exist at once (``chunk * N`` fp32), so 10k+ videos fit.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "DIRECTIONS", "TIES", "check_embeddings", "similarity_matrix", "rank_counts",
    "rank_counts_from_similarity", "metrics_from_counts", "retrieval_metrics", "format_table",
]

# direction key -> (human name, which modality is the query)
DIRECTIONS = {"v2a": ("V→A", "video"), "a2v": ("A→V", "audio")}
TIES = ("official", "optimistic", "pessimistic")
RECALL_KS = (1, 5, 10)

Ties = Literal["official", "optimistic", "pessimistic"]


def check_embeddings(a: torch.Tensor, v: torch.Tensor) -> None:
    """Validate per-frame embeddings before any compute.

    a, v: [N, T, D] floating, same shape, N >= 1, all finite. Raises TypeError/ValueError naming
    the problem (a NaN would otherwise silently drop rows from the official metric).
    """
    for name, x in (("audio", a), ("video", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} embeddings must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} embeddings must be floating point, got dtype {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"{name} embeddings must be [N, T, D], got shape {tuple(x.shape)}")
    if a.shape != v.shape:
        raise ValueError(f"audio embeddings {tuple(a.shape)} and video embeddings {tuple(v.shape)} "
                         "must have the same [N, T, D] shape")
    n, t, d = a.shape
    if n == 0 or t == 0 or d == 0:
        raise ValueError(f"empty embeddings: shape {tuple(a.shape)} (need N, T, D >= 1)")
    for name, x in (("audio", a), ("video", v)):
        bad = ~torch.isfinite(x).reshape(n, -1).all(dim=1)
        if bool(bad.any()):  # one host sync, on the input check, before compute
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name} embeddings contain NaN/Inf in {int(bad.sum())} of {n} videos "
                             f"(first rows {rows}); refusing to compute retrieval metrics")


def _flat_normalised(x: torch.Tensor) -> torch.Tensor:
    """x: [N, T, D] -> [N, T*D] fp32, each frame embedding L2-normalised (official eps 1e-12)."""
    n = x.shape[0]
    return F.normalize(x.float(), p=2, dim=-1, eps=1e-12).reshape(n, -1)


class _HighestPrecision:
    """fp32 'highest' matmul precision (no TF32 on CUDA) for the block, restored afterwards."""

    def __enter__(self):
        self.prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.prev)
        return False


def similarity_matrix(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Full score matrix for small sets (plots, tests).

    q: [N, T, D] queries, c: [M, T, D] candidates -> S: [N, M] fp32, S[i, j] = mean over the T
    aligned frames of cos(q[i, k], c[j, k]).
    """
    if q.ndim != 3 or c.ndim != 3 or q.shape[1:] != c.shape[1:]:
        raise ValueError(f"queries {tuple(q.shape)} and candidates {tuple(c.shape)} must be "
                         "[N, T, D] and [M, T, D]")
    t = q.shape[1]
    with _HighestPrecision():
        return _flat_normalised(q) @ _flat_normalised(c).T / t


def rank_counts(q: torch.Tensor, c: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query tie counts, computed ``chunk`` rows of S at a time.

    q, c: [N, T, D] (query i matches candidate i). Returns (greater, equal), both [N] int64 on
    q's device: greater[i] = #{j : S[i, j] > S[i, i]}, equal[i] = #{j : S[i, j] == S[i, i]}
    (>= 1, the diagonal itself). The diagonal is read from the same matmul block as its row, so
    comparisons within a row use values produced by one kernel call, like the official full matrix.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    if q.shape != c.shape:
        raise ValueError(f"queries {tuple(q.shape)} and candidates {tuple(c.shape)} must match")
    n, t, _ = q.shape
    qf, cf = _flat_normalised(q), _flat_normalised(c)
    greater = torch.empty(n, dtype=torch.long, device=q.device)
    equal = torch.empty(n, dtype=torch.long, device=q.device)
    with _HighestPrecision():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            rows = torch.arange(e - s, device=q.device)
            block = qf[s:e] @ cf.T / t                       # [b, N]; the only O(chunk*N) buffer
            diag = block[rows, rows + s].unsqueeze(1)        # [b, 1]
            greater[s:e] = (block > diag).sum(dim=1)
            equal[s:e] = (block == diag).sum(dim=1)
    return greater, equal


def rank_counts_from_similarity(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(greater, equal) [N] int64 from a precomputed square score matrix sim: [N, N]."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity matrix must be square [N, N] with N >= 1, got {tuple(sim.shape)}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("similarity matrix contains NaN/Inf; refusing to compute retrieval metrics")
    diag = sim.diagonal().unsqueeze(1)
    return (sim > diag).sum(dim=1), (sim == diag).sum(dim=1)


def _kth_entry(hist_cum: torch.Tensor, k: int) -> int:
    """Value of the k-th smallest (0-based) pooled entry, given the cumulative histogram."""
    return int(torch.searchsorted(hist_cum, torch.tensor([k], dtype=hist_cum.dtype), right=True)[0])


def metrics_from_counts(greater: torch.Tensor, equal: torch.Tensor, ties: Ties = "official") -> dict:
    """R@1/5/10 (percent), MR and the number of pooled entries from per-query counts.

    greater, equal: [N] int64 (see :func:`rank_counts`). Returns
    ``{"R@1", "R@5", "R@10", "MR", "entries"}``; see the module docstring for ``ties``.
    """
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} must be one of {list(TIES)}")
    g = greater.detach().to("cpu", torch.long)   # N small ints: one host transfer per direction
    t = equal.detach().to("cpu", torch.long)
    n = g.numel()
    if n == 0:
        raise ValueError("no queries: cannot compute retrieval metrics of an empty set")
    if bool((t < 1).any()):
        raise ValueError("every query must tie at least with itself (equal >= 1); got a count of 0")
    if ties == "optimistic":
        lo, cnt = g, torch.ones_like(g)
    elif ties == "pessimistic":
        lo, cnt = g + t - 1, torch.ones_like(g)
    else:
        lo, cnt = g, t
    hi = lo + cnt                                           # entries are the ranks [lo, hi)
    entries = int(cnt.sum())
    out: dict = {}
    for k in RECALL_KS:
        hits = int((torch.clamp(hi, max=k) - lo).clamp(min=0).sum())
        out[f"R@{k}"] = 100.0 * float(hits) / entries
    # Histogram of pooled entries over ranks 0..max via a difference array (no expansion).
    size = int(hi.max()) + 1
    diff = torch.bincount(lo, minlength=size) - torch.bincount(hi, minlength=size)
    cum = torch.cumsum(torch.cumsum(diff, 0), 0)            # cum[r] = #entries <= r
    if entries % 2:
        median = float(_kth_entry(cum, entries // 2))
    else:
        median = (_kth_entry(cum, entries // 2 - 1) + _kth_entry(cum, entries // 2)) / 2.0
    out["MR"] = median + 1.0
    out["entries"] = entries
    return out


def retrieval_metrics(a: torch.Tensor, v: torch.Tensor, chunk: int = 4096, ties: Ties = "official") -> dict:
    """Both directions from per-frame embeddings.

    a, v: [N, T, D] audio / video per-frame globals (any scale; normalised here), on any device.
    Returns ``{"v2a": {...}, "a2v": {...}, "num_videos": N, "num_frames": T, "ties": ties}``.
    """
    check_embeddings(a, v)
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} must be one of {list(TIES)}")
    out: dict = {}
    for key, (_, query) in DIRECTIONS.items():
        q, c = (v, a) if query == "video" else (a, v)
        out[key] = metrics_from_counts(*rank_counts(q, c, chunk), ties=ties)
    out.update(num_videos=int(a.shape[0]), num_frames=int(a.shape[1]), ties=ties)
    return out


def format_table(result: dict) -> str:
    """Markdown table of a :func:`retrieval_metrics` result."""
    lines = ["| direction | R@1 | R@5 | R@10 | MR |", "|---|---|---|---|---|"]
    for key, (name, _) in DIRECTIONS.items():
        m = result[key]
        lines.append(f"| {name} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['MR']:g} |")
    n = result.get("num_videos", "?")
    lines.append(f"\n{n} videos x {result.get('num_frames', '?')} frames, ties={result.get('ties', '?')}")
    return "\n".join(lines)
