"""Packed-sequence layouts of the fast model: fixed capacities, cu_seqlens built once per device.

Every view the model runs has a length fixed by the config: a modality view is
``[CLS, k visible patches, R registers]`` with ``k = num_keep(N, ratio)``, the same for every
sample. So a layout (which views, how many sequences, how long) depends only on the config, the
batch size and the mask ratios, never on the data. Its ``cu_seqlens`` is built once per
(layout, device) and cached, its packed length is a Python int, and every tensor the fast model
allocates has a static shape: a captured CUDA graph can be replayed step after step.

Bucketed per-step ratios (not enabled by default): with ``masking`` drawing a ratio per step from
a small set of buckets, the model would need one layout per bucket (``view_layout`` is already
keyed by lengths, so the cache holds them all), one captured graph per bucket (select the graph
by the step's bucket on the host, where the ratio is drawn, so no device read is needed), and a
static input buffer per bucket for ``ids_keep``. Nothing else in the model changes.

CUDA graphs: run one eager step before capturing, so every layout is already cached (building one
copies ``cu_seqlens`` host -> device, which is not allowed while capturing). The forwards read no
device value on the host (``torch.compile(fullgraph=True)`` of ``student_forward`` traces without a
graph break; see tests/test_fast_model.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from tgdp.model.attention import SegmentGroup, VarlenMeta

__all__ = ["view_layout", "gather_rows", "split_groups", "group_view"]


def view_layout(views: Sequence[tuple[int, int]], device: torch.device | str) -> VarlenMeta:
    """Layout of views packed back to back.

    views: ``(count, length)`` per view (``count`` sequences of ``length`` tokens each), e.g.
    ``[(B, 1 + k_rec + R), (B, 1 + k_con + R)]``. Equal calls return the same cached object, so the
    cu_seqlens tensor is built (one host->device copy) once per layout and device.
    """
    key = tuple((int(c), int(n)) for c, n in views)
    if not key:
        raise ValueError("views is empty: a layout needs at least one (count, length) view")
    for c, n in key:
        if c < 1 or n < 1:
            raise ValueError(f"view (count={c}, length={n}) must have count >= 1 and length >= 1")
    if torch.compiler.is_compiling():
        # Under torch.compile the layout is traced once into the graph as constants; skip the cache
        # wrapper explicitly (Dynamo would ignore it anyway, with a warning).
        return _cached_layout.__wrapped__(key, str(torch.device(device)))
    return _cached_layout(key, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _cached_layout(views: tuple[tuple[int, int], ...], device: str) -> VarlenMeta:
    groups, start, lengths = [], 0, []
    for count, length in views:
        groups.append(SegmentGroup(start, count, length))
        start += count * length
        lengths += [length] * count
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return VarlenMeta(cu_seqlens=cu.to(device), max_seqlen=max(lengths), groups=tuple(groups))


def gather_rows(x: Tensor, ids: Tensor) -> Tensor:
    """x: [B, N, D], ids: [B, k] long -> [B, k, D] (the visible tokens, in ``ids`` order)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def group_view(x: Tensor, g: SegmentGroup) -> Tensor:
    """Packed rows of one group as a batch: x: [total, ...] -> [count, length, ...] (a view)."""
    return x[g.start:g.stop].unflatten(0, (g.count, g.length))


def split_groups(x: Tensor, meta: VarlenMeta) -> list[Tensor]:
    """x: [total, ...] -> one [count, length, ...] view per group of ``meta``."""
    return [group_view(x, g) for g in meta.groups]
