"""Host-side batch packer for the data loader: random reconstruction masks + varlen metadata.

For every sample ``b`` of a batch whose clips may be shorter than the window (trailing padding
patches that must never be visible), :func:`pack` draws a uniform random subset of the *valid*
patches to keep and writes, into caller-provided fixed-capacity buffers (:class:`PackBuffers`;
numpy arrays or CPU torch tensors, e.g. pinned, so a captured CUDA graph always sees the same
addresses downstream):

- ``ids_keep [B, K_cap] int64``: kept patch indices in keep (draw) order, ``-1`` after ``k_b``;
- ``ids_restore [B, N] int64``: inverse of ``ids_shuffle = (kept, removed valid, padding
  ascending)``, the :class:`tgdp.masking.Masks` convention;
- ``mask [B, N]`` uint8 / bool / float32: 1 = removed or padding, 0 = visible;
- ``cu_seqlens [B + 1] int32``: packed sequence ``b`` = ``extra_front`` tokens (CLS),
  its ``k_b`` visible patches, ``extra_back`` tokens (registers) — the official
  ``[CLS, patches, registers]`` order;
- ``pos_ids [T_cap] int64``: patch index of each packed token, ``-1`` for extra tokens and for the
  unused tail; ``seq_ids [T_cap] int32``: sample index of each packed token, ``-1`` in the tail.

Valid patches: generic form ``valid[b]`` = prefix length in token index (valid tokens
``0..valid[b]-1``); grid form ``grid=(rows, cols)`` with ``valid[b]`` = valid *time columns*, valid
tokens ``{f*cols + t : t < valid[b]}`` (audio token order f·26 + t). With ``n_b`` valid tokens the
keep count is ``k_b = max(1, floor(n_b * (1 - ratio)))`` (0 when ``n_b == 0``), the rule of
:func:`tgdp.masking.num_keep`, or ``min(keep, n_b)`` for a fixed ``keep``.

Randomness is a splitmix64 stream per (seed, step, sample) and a partial Fisher-Yates shuffle,
implemented identically in C++ (``csrc/packer.cpp``, GIL released) and in the numpy fallback here,
so both give bit-identical buffers. Pass ``step`` (global step or epoch·steps + step) so every batch
differs deterministically; fold the data-parallel rank into ``seed``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np

__all__ = ["HAS_EXTENSION", "PackBuffers", "PackResult", "pack", "capacities", "config_kwargs",
           "force_fallback", "splitmix64_stream"]

_EXT_VERSION = 1  # must equal VERSION in csrc/packer.cpp (signature + random stream)

try:  # the compiled extension is optional (setup.py: TGDP_NO_EXT=1 or a failed build skip it)
    from tgdp import _packer as _ext
except ImportError:
    _ext = None
if _ext is not None and getattr(_ext, "VERSION", None) != _EXT_VERSION:
    warnings.warn(f"ignoring stale tgdp._packer (VERSION={getattr(_ext, 'VERSION', None)}, want "
                  f"{_EXT_VERSION}); rebuild with `python setup.py build_ext --inplace`", stacklevel=1)
    _ext = None

#: True when the C++ packer is importable (and not disabled with ``TGDP_NO_EXT=1``).
HAS_EXTENSION: bool = _ext is not None and os.environ.get("TGDP_NO_EXT", "0") != "1"
_FORCE_FALLBACK = False

_GOLDEN = 0x9E3779B97F4A7C15
_SEED_SALT = 0x243F6A8885A308D3
_MASK_DTYPES = ("uint8", "bool", "float32")
_FIELDS = ("ids_keep", "ids_restore", "mask", "cu_seqlens", "pos_ids", "seq_ids")  # buffer order


@contextlib.contextmanager
def force_fallback(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``pack(backend="auto")`` uses the numpy fallback (tests, benchmarks)."""
    global _FORCE_FALLBACK
    old, _FORCE_FALLBACK = _FORCE_FALLBACK, enabled
    try:
        yield
    finally:
        _FORCE_FALLBACK = old


@dataclass(frozen=True)
class PackBuffers:
    """Fixed-capacity outputs (numpy views; torch CPU tensors passed to :func:`pack` are shared).

    ids_keep: [B, K_cap] int64; ids_restore: [B, N] int64; mask: [B, N] uint8|bool|float32;
    cu_seqlens: [B + 1] int32; pos_ids: [T_cap] int64; seq_ids: [T_cap] int32.
    """

    ids_keep: Any
    ids_restore: Any
    mask: Any
    cu_seqlens: Any
    pos_ids: Any
    seq_ids: Any

    @classmethod
    def allocate(cls, batch: int, num_patches: int, keep_capacity: int, token_capacity: int,
                 mask_dtype: str = "uint8") -> "PackBuffers":
        """numpy buffers; use :func:`capacities` for the capacities of a config's ratio."""
        return cls(np.empty((batch, keep_capacity), np.int64), np.empty((batch, num_patches), np.int64),
                   np.empty((batch, num_patches), np.dtype(mask_dtype)), np.empty(batch + 1, np.int32),
                   np.empty(token_capacity, np.int64), np.empty(token_capacity, np.int32))


@dataclass(frozen=True)
class PackResult:
    """The filled buffers (the caller's objects) and the counts of this batch."""

    buffers: PackBuffers
    total_tokens: int     # packed tokens incl. extra tokens = cu_seqlens[B]
    max_seqlen: int       # longest packed sequence (flash-attn's max_seqlen)
    extra_tokens: int     # extra_front + extra_back per sequence

    @property
    def num_keep(self) -> np.ndarray:
        """[B] int64: visible patches per sample."""
        return np.diff(np.asarray(self.buffers.cu_seqlens).astype(np.int64)) - self.extra_tokens


def capacities(batch: int, num_patches: int, ratio: float | None = None, keep: int | None = None,
               extra_front: int = 0, extra_back: int = 0) -> tuple[int, int]:
    """(keep_capacity, token_capacity) that hold any batch: full-length samples keep the most."""
    k = _keep_counts(np.array([num_patches], np.int64), ratio, -1 if keep is None else keep)[0]
    return int(k), batch * (extra_front + int(k) + extra_back)


def config_kwargs(cfg: Any, modality: Literal["audio", "video"]) -> dict[str, Any]:
    """pack()/capacities() geometry of the reconstruction path for a :class:`tgdp.configs.Config`.

    Sequences are [CLS, visible patches, R registers] (spec §1.4). Audio uses the grid form (valid =
    time columns of the (n_mels/p, T/p) grid, token f·cols + t); video frames are never padded, so
    pass ``valid = [num_patches_v] * B``.
    """
    m = cfg.model
    common = dict(ratio=cfg.masking.rec_ratio, extra_front=1, extra_back=m.num_register_tokens)
    if modality == "audio":
        return dict(num_patches=m.num_patches_a, grid=m.audio_grid, **common)
    if modality == "video":
        return dict(num_patches=m.num_patches_v, **common)
    raise ValueError(f"modality={modality!r} must be 'audio' or 'video'")


def pack(valid: Any, *, num_patches: int, seed: int, step: int = 0, ratio: float | None = None,
         keep: int | None = None, grid: tuple[int, int] | None = None, extra_front: int = 0,
         extra_back: int = 0, out: PackBuffers | None = None, mask_dtype: str = "uint8",
         backend: Literal["auto", "cpp", "numpy"] = "auto") -> PackResult:
    """Draw per-sample random masks and pack the visible tokens (see the module docstring).

    valid: [B] int (numpy, list or CPU tensor): valid prefix length, or valid time columns with
    ``grid``. Exactly one of ``ratio`` (in [0, 1)) and ``keep`` is given. ``out`` defaults to new
    numpy buffers sized by :func:`capacities` with a ``mask_dtype`` mask (ignored when ``out`` is
    given: its mask's dtype is used). ``backend``: "auto" = C++ when built (unless
    :func:`force_fallback`), "cpp" (RuntimeError if not built) or "numpy".
    Raises ValueError naming the offending values before anything is written.
    """
    if (ratio is None) == (keep is None):
        raise ValueError(f"give exactly one of ratio={ratio!r} and keep={keep!r}")
    if keep is not None and keep < 0:
        raise ValueError(f"keep={keep!r} must be >= 0")
    for name, v in (("seed", seed), ("step", step)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**64:
            raise ValueError(f"{name}={v!r} must be an integer in [0, 2**64)")
    valid_np = _as_array(valid, "valid")
    if valid_np.dtype.kind not in "iu" and valid_np.size:
        raise ValueError(f"valid must hold integers, got {valid_np.dtype}")
    valid_np = np.ascontiguousarray(valid_np, dtype=np.int64)
    rows, cols = (0, 0) if grid is None else (int(grid[0]), int(grid[1]))
    if grid is not None and cols == 0:
        raise ValueError(f"grid={tuple(grid)!r} must be positive")
    if out is None:
        out = _default_buffers(valid_np, num_patches, ratio, keep, extra_front, extra_back, mask_dtype)
    bufs = [_as_array(getattr(out, f), f, output=True) for f in _FIELDS]
    args = (valid_np, int(num_patches), rows, cols, -1.0 if ratio is None else float(ratio),
            -1 if keep is None else int(keep), int(seed), int(step), int(extra_front), int(extra_back))
    if backend == "cpp" or (backend == "auto" and HAS_EXTENSION and not _FORCE_FALLBACK):
        if _ext is None:
            raise RuntimeError("backend='cpp' but tgdp._packer is not built (python setup.py build_ext --inplace)")
        total, max_len = _ext.pack(*args, *bufs)
    elif backend in ("auto", "numpy"):
        total, max_len = _pack_numpy(*args, *bufs)
    else:
        raise ValueError(f"backend={backend!r} must be 'auto', 'cpp' or 'numpy'")
    return PackResult(out, int(total), int(max_len), int(extra_front) + int(extra_back))


def _default_buffers(valid, num_patches, ratio, keep, extra_front, extra_back, mask_dtype) -> PackBuffers:
    """Buffers sized by :func:`capacities`; for bad scalars they are empty and the backend reports."""
    batch = valid.shape[0] if valid.ndim == 1 else 0
    sane = (num_patches >= 1 and extra_front >= 0 and extra_back >= 0
            and (0 <= keep <= num_patches if keep is not None else 0.0 <= ratio < 1.0))
    kcap, tcap = capacities(batch, num_patches, ratio, keep, extra_front, extra_back) if sane else (0, 0)
    return PackBuffers.allocate(batch, max(num_patches, 0), kcap, tcap, mask_dtype)


def _as_array(x: Any, name: str, output: bool = False) -> np.ndarray:
    """numpy view of an array-like; a torch tensor must be on the CPU (shares its memory)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "device") and hasattr(x, "numpy"):  # torch.Tensor, without importing torch
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor (host packer), got device {x.device}")
        return x.detach().numpy()
    if output:  # np.asarray would copy a list, and the results would silently go nowhere
        raise ValueError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")
    return np.asarray(x)


# ------------------------------- numpy twin of csrc/packer.cpp -------------------------------

def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (numpy integer arrays wrap mod 2**64)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stream_states(seed: int, step: int, batch: int) -> np.ndarray:
    base = _mix64(_mix64(np.array([seed ^ _SEED_SALT], np.uint64)) ^ np.uint64(step))
    return _mix64(base ^ np.arange(batch, dtype=np.uint64))


def splitmix64_stream(seed: int, step: int, sample: int, count: int) -> np.ndarray:
    """[count] uint64: the first draws of sample ``sample``'s stream (numpy twin, for tests)."""
    state = _stream_states(seed, step, sample + 1)[sample:]
    steps = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    return _mix64(state + steps)


def _keep_counts(n: np.ndarray, ratio: float | None, keep: int) -> np.ndarray:
    """[B] int64 keep counts; float64 maths exactly as the C++ keep_count."""
    if keep >= 0:
        return np.minimum(n, keep)
    k = np.floor(n.astype(np.float64) * (1.0 - float(ratio))).astype(np.int64)
    return np.where(n > 0, np.maximum(k, 1), 0)


def _check_out(a: np.ndarray, name: str, want: str) -> None:
    if str(a.dtype) != want:
        raise ValueError(f"{name} must be {want}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only")


def _check_shape(a: np.ndarray, name: str, want: tuple[int, ...], what: str) -> None:
    if a.ndim != len(want) or any(w >= 0 and s != w for s, w in zip(a.shape, want)):
        raise ValueError(f"{name} has shape {tuple(a.shape)} but {what}")


def _pack_numpy(valid, num_patches, rows, cols, ratio, keep, seed, step, extra_front, extra_back,
                ids_keep, ids_restore, mask, cu_seqlens, pos_ids, seq_ids) -> tuple[int, int]:
    """Same validation order and messages as csrc/packer.cpp::pack, then a batch-vectorised
    partial Fisher-Yates: one numpy step per draw index j, all samples at once."""
    n_p = num_patches
    if n_p < 1:
        raise ValueError(f"num_patches={n_p} must be >= 1")
    if cols != 0:
        if rows < 1 or cols < 1:
            raise ValueError(f"grid=({rows}, {cols}) must be positive")
        if rows * cols != n_p:
            raise ValueError(f"grid=({rows}, {cols}) has {rows * cols} tokens but num_patches={n_p}")
    if keep < 0 and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio!r} must be in [0, 1)")
    if keep > n_p:
        raise ValueError(f"keep={keep} exceeds num_patches={n_p}")
    if extra_front < 0 or extra_back < 0:
        raise ValueError(f"extra_front={extra_front}, extra_back={extra_back} must be >= 0")
    if valid.dtype != np.int64:
        raise ValueError(f"valid must be int64, got {valid.dtype}")
    if valid.ndim != 1:
        raise ValueError(f"valid must be 1-D [B], got shape {tuple(valid.shape)}")
    B = valid.shape[0]
    limit = n_p if cols == 0 else cols
    bad = np.flatnonzero((valid < 0) | (valid > limit))
    if bad.size:
        b, v = int(bad[0]), int(valid[bad[0]])
        if v < 0:
            raise ValueError(f"valid[{b}]={v} is negative")
        if cols == 0:
            raise ValueError(f"valid[{b}]={v} exceeds num_patches={n_p}")
        raise ValueError(f"valid[{b}]={v} exceeds cols={cols} of grid=({rows}, {cols}) "
                         "(grid form counts valid time columns)")
    n = valid if cols == 0 else valid * rows
    k = _keep_counts(n, ratio, keep)
    kmax = int(k.max()) if B else 0
    lens = extra_front + k + extra_back
    total, max_len = int(lens.sum()), int(lens.max()) if B else 0
    if total > 2**31 - 1:
        raise ValueError(f"batch packs {total} tokens, more than int32 cu_seqlens can hold")
    batch_msg = f"the batch has B={B} samples"
    grid_msg = f"{batch_msg} of num_patches={n_p}"
    _check_out(ids_keep, "ids_keep", "int64")
    _check_shape(ids_keep, "ids_keep", (B, -1), f"must be [B, capacity]; {batch_msg}")
    keep_cap = ids_keep.shape[1]
    if keep_cap < kmax:
        raise ValueError(f"ids_keep holds {keep_cap} tokens per row but a sample keeps {kmax}")
    _check_out(ids_restore, "ids_restore", "int64")
    _check_shape(ids_restore, "ids_restore", (B, n_p), f"must be [B, N]; {grid_msg}")
    if str(mask.dtype) not in _MASK_DTYPES:
        raise ValueError(f"mask must be uint8, bool or float32, got {mask.dtype}")
    _check_out(mask, "mask", str(mask.dtype))
    _check_shape(mask, "mask", (B, n_p), f"must be [B, N]; {grid_msg}")
    _check_out(cu_seqlens, "cu_seqlens", "int32")
    _check_shape(cu_seqlens, "cu_seqlens", (B + 1,), f"must be [B + 1]; {batch_msg}")
    _check_out(pos_ids, "pos_ids", "int64")
    _check_shape(pos_ids, "pos_ids", (-1,), "must be 1-D [capacity]")
    tok_cap = pos_ids.shape[0]
    if tok_cap < total:
        raise ValueError(f"pos_ids holds {tok_cap} tokens but the batch packs {total}")
    _check_out(seq_ids, "seq_ids", "int32")
    _check_shape(seq_ids, "seq_ids", (tok_cap,), f"must match pos_ids [{tok_cap}]")

    # ids_shuffle before the draw: valid tokens ascending, then padding ascending (stable sort).
    tok = np.arange(n_p, dtype=np.int64)
    coord = tok if cols == 0 else tok % cols
    perm = np.argsort(coord[None, :] >= valid[:, None], axis=1, kind="stable").astype(np.int64)
    rows_b = np.arange(B)
    state = _stream_states(seed, step, B)
    for j in range(kmax):
        state = state + np.uint64(_GOLDEN)
        x = _mix64(state)
        active = j < k
        bound = np.where(active, n - j, 0).astype(np.uint64)
        r = j + ((x >> np.uint64(32)) * bound >> np.uint64(32)).astype(np.int64)
        r = np.where(active, r, j)
        a = perm[:, j].copy()
        perm[:, j] = perm[rows_b, r]
        perm[rows_b, r] = a

    ids_keep[...] = -1
    w = min(keep_cap, n_p)  # a row never keeps more than N; capacity beyond that stays -1
    ids_keep[:, :w] = np.where(tok[None, :w] < k[:, None], perm[:, :w], -1)
    ids_restore[rows_b[:, None], perm] = tok[None, :]
    mask[...] = (ids_restore >= k[:, None]).astype(mask.dtype)

    cu = np.zeros(B + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    cu_seqlens[...] = cu
    pos_ids[...] = -1
    seq_ids[...] = -1
    seq_ids[:total] = np.repeat(np.arange(B, dtype=np.int32), lens)
    k_start = np.repeat(cu[:-1] + extra_front, k)
    k_off = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    pos_ids[k_start + k_off] = perm[tok[None, :] < k[:, None]]
    return total, max_len
