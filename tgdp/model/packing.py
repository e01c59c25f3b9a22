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

Built once per (layout, device) and cached on the device (:data:`_LAYOUTS`): ``cu_seqlens`` is
made on the device by ``arange`` (no host tensor, no host->device copy) and marked as a static
address, so a compiled forward reads it as a graph *input* at a fixed address (CUDA graphs replay
it without a copy). Build the layouts of a batch size before compiling (``TGDP.prepare_layouts``;
``train_step`` does it every step, a few dict lookups): a layout first met while Dynamo traces is
built inside the graph instead (the same ``arange``, device work only), never cached from there.
The traced training forward holds no ``torch.tensor`` and no device ``.to`` (tests/test_hot_path.py).
The forwards read no device value on the host (``torch.compile(fullgraph=True)`` of the training
forward traces without a graph break).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tgdp.model.attention import SegmentGroup, VarlenMeta

__all__ = ["view_layout", "gather_rows", "split_groups", "group_view"]


# (views, device) -> VarlenMeta. A plain dict (not functools.lru_cache, which Dynamo inlines past):
# Dynamo reads an existing entry as a graph input and guards only on that entry.
_LAYOUTS: dict[tuple, VarlenMeta] = {}
_MAX_LAYOUTS = 256


def view_layout(views: Sequence[tuple[int, int]], device: torch.device | str) -> VarlenMeta:
    """Layout of views packed back to back.

    views: ``(count, length)`` per view (``count`` sequences of ``length`` tokens each), e.g.
    ``[(B, 1 + k_rec + R), (B, 1 + k_con + R)]``. Equal calls return the same cached object, so the
    cu_seqlens tensor is built (on the device, no host copy) once per layout and device.
    """
    key = tuple((int(c), int(n)) for c, n in views)
    if not key:
        raise ValueError("views is empty: a layout needs at least one (count, length) view")
    for c, n in key:
        if c < 1 or n < 1:
            raise ValueError(f"view (count={c}, length={n}) must have count >= 1 and length >= 1")
    dev = torch.device(device)
    meta = _LAYOUTS.get((key, str(dev)))
    if meta is not None:
        return meta
    if torch.compiler.is_compiling():
        # Not prepared before tracing: build it inside the graph (device arange, no host work).
        return _build_layout(key, dev)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        del _LAYOUTS[next(iter(_LAYOUTS))]   # oldest first
    meta = _LAYOUTS[(key, str(dev))] = _build_layout(key, dev)
    torch._dynamo.mark_static_address(meta.cu_seqlens)   # a fixed address for CUDA-graph replays
    return meta


def _build_layout(views: tuple[tuple[int, int], ...], device: torch.device) -> VarlenMeta:
    """cu_seqlens [S + 1] int32 = [0, L0, 2 L0, ..., total]: per view an arange on the device."""
    groups, start, parts = [], 0, []
    for count, length in views:
        groups.append(SegmentGroup(start, count, length))
        parts.append(torch.arange(start, start + count * length, length, dtype=torch.int32, device=device))
        start += count * length
    parts.append(torch.full((1,), start, dtype=torch.int32, device=device))
    cu = torch.cat(parts)
    return VarlenMeta(cu_seqlens=cu, max_seqlen=max(n for _, n in views), groups=tuple(groups))


def gather_rows(x: Tensor, ids: Tensor) -> Tensor:
    """x: [B, N, D], ids: [B, k] long -> [B, k, D] (the visible tokens, in ``ids`` order)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def group_view(x: Tensor, g: SegmentGroup) -> Tensor:
    """Packed rows of one group as a batch: x: [total, ...] -> [count, length, ...] (a view)."""
    return x[g.start:g.stop].unflatten(0, (g.count, g.length))


def split_groups(x: Tensor, meta: VarlenMeta) -> list[Tensor]:
    """x: [total, ...] -> one [count, length, ...] view per group of ``meta``."""
    return [group_view(x, g) for g in meta.groups]
