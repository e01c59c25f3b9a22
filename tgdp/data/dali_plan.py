"""Epoch planning for the DALI path (:mod:`tgdp.data.dali`): shard catalog, order, frames, index files.

DALI's webdataset reader is run sequentially (no DALI shuffle, no DALI RNG), so everything random
about a pass is decided here, in Python, from ``(seed, epoch)``:

- the catalog (:func:`load_catalog`): per shard its keys and member offsets/sizes, from the
  ``.idx`` next to the tar or a header scan (:func:`scan_shard`), with the samples that must never
  reach DALI (missing/empty member, cut off by a truncated tar) marked as flaws;
- the plan (:func:`plan_epoch`): the shard order and a full permutation of each shard's samples
  (train), the sequence cut into ``world_size`` contiguous parts (one per rank), and each sample's
  frame (:func:`planned_frame`: the torch path's draw, so both paths see the same frames);
- the index files (:func:`write_indexes`): ``wds2idx`` v1.2 files listing the plan in order, where
  the chosen frame is the member ``img`` so DALI reads and decodes only that JPEG.

Mixing: a batch holds consecutive samples of the permuted sequence, i.e. mostly one shard (256
clips from ``tgdp.prepare``, which cuts shards in sha1-of-id order so that a class-sorted input
list still gives shards of mixed classes); ``data.shuffle_buffer`` is not used by the DALI path.
"""

from __future__ import annotations

import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from tgdp.data.batch import sample_generator
from tgdp.data.shards import index_is_current, read_index, read_manifest

__all__ = ["ShardEntry", "scan_shard", "load_catalog", "planned_frame", "plan_epoch", "write_indexes"]

_NONE = (0, 0, "")  # offset, size, name of a missing member


class ShardEntry(NamedTuple):
    """One shard of the catalog. ``off``/``size``: ``[n, len(exts)]`` int64 (16 bytes per member:
    58 MB for 200k clips); size 0 = missing or empty member. ``flaw``: sample -> skip reason."""

    path: str
    keys: list[str]
    prefix: list[str]   # member name without the extension ("<dir>/<key>.")
    off: np.ndarray
    size: np.ndarray
    flaw: dict[int, str]


def scan_shard(tar_path: Path) -> list[tuple[str, dict[str, tuple[int, int, str]], bool]]:
    """``(key, {ext: (data offset, size, member name)}, complete)`` per sample of one tar, in tar order.

    From the ``.idx`` next to the tar when there is one and it still matches the tar
    (:func:`tgdp.data.shards.index_is_current`: two header reads), else from the tar headers
    (``tarfile`` seeks from header to header; the payloads are not read). A stale index (a member
    deleted or added after it was written) would point DALI at the wrong bytes for every later
    sample, so it is not used. A header scan that hits the end of a truncated tar keeps what it
    read; the sample it was in is not complete.
    """
    idx = tar_path.with_suffix(".idx")
    if idx.is_file():
        samples = read_index(idx)
        if index_is_current(tar_path, samples):
            return [(s[0][3].rsplit("/", 1)[-1].split(".", 1)[0], {e: (o, n, name) for e, o, n, name in s}, True)
                    for s in samples]
    out, key, parts, complete = [], None, {}, True
    with tarfile.open(tar_path, "r:") as tar:
        try:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if not m.isfile() or base.startswith(".") or "." not in base:
                    continue
                k, ext = base.split(".", 1)
                if k != key:
                    if key is not None:
                        out.append((key, parts, True))
                    key, parts = k, {}
                parts[ext] = (m.offset_data, m.size, m.name)
        except (tarfile.ReadError, EOFError):
            complete = False
    if key is not None:
        out.append((key, parts, complete))
    return out


def load_catalog(root: Path, exts: list[str]) -> tuple[list[ShardEntry], int]:
    """The manifest's shards as :class:`ShardEntry` (members in ``exts`` order) and the number of
    unreadable tars (kept as empty entries, so shard indices match the manifest)."""
    shards, bad_tars = [], 0
    for s in read_manifest(root)["shards"]:
        path = str(root / s["path"])
        try:
            samples = scan_shard(Path(path))
        except (tarfile.TarError, OSError, ValueError):
            samples = []
            bad_tars += 1  # "bad shard", counted once per epoch by rank 0
        cols = [[m.get(e, _NONE) for e in exts] for _, m, _ in samples]
        off = np.array([[c[0] for c in row] for row in cols], np.int64).reshape(-1, len(exts))
        size = np.array([[c[1] for c in row] for row in cols], np.int64).reshape(off.shape)
        prefix = [m.get("json", _NONE)[2][: -len("json")] for _, m, _ in samples]
        # A member past the end of the tar (truncated after its .idx was written) would fail in
        # DALI's reader, where the probe cannot pin it down: it is left out like the torch
        # loader's "bad shard" (which also loses the rest of that shard).
        cut = (off + size > (Path(path).stat().st_size if samples else 0)).any(1)
        cut |= np.array([not c for _, _, c in samples], bool)
        flaw = {i: "bad shard" if c else "missing member"
                for i, (empty, c) in enumerate(zip((size == 0).any(1), cut)) if empty or c}
        shards.append(ShardEntry(path, [k for k, _, _ in samples], prefix, off, size, flaw))
    return shards, bad_tars


def planned_frame(key: str, epoch: int, *, mode: str, frame: int | None, frames_per_clip: int, seed: int) -> int:
    """The frame of sample ``key`` in ``epoch``: -1 (all) in retrieval, ``frame`` when forced, else
    the torch loader's draw for a sample whose id is its key (ids from tgdp.prepare usually are)."""
    if mode == "retrieval":
        return -1
    if frame is not None:
        return frame
    return int(torch.randint(frames_per_clip, (1,), generator=sample_generator(seed, epoch, key)))


def plan_epoch(shards: list[ShardEntry], bad: dict[tuple[int, int], str], *, epoch: int, seed: int,
               shuffle: bool, rank: int, world_size: int, bad_tars: int,
               frame_of: Callable[[str, int], int]) -> tuple[list[tuple[int, int, int]], Counter]:
    """This rank's samples of one epoch, in order, as ``(shard, sample, frame)`` (frame -1: all),
    and the skip counts of the corrupt samples in its share (flaws, and ``bad``: the known
    undecodable ``(shard, sample) -> reason``). ``frame_of(key, epoch)`` picks a sample's frame."""
    order = list(range(len(shards)))
    if shuffle:
        random.Random(f"{seed}:{epoch}:dali-shards").shuffle(order)
    seq = []
    for s in order:
        ids = [(s, i) for i in range(len(shards[s].keys))]
        if shuffle:  # a full permutation of the shard (256 clips from tgdp.prepare)
            random.Random(f"{seed}:{epoch}:{shards[s].path}").shuffle(ids)
        seq += ids
    n = len(seq)
    # Split the whole sequence (corrupt samples included): which rank gets what, and the order
    # of the good samples, do not depend on which samples turn out to be corrupt.
    plan, skipped = [], Counter({"bad shard": bad_tars if rank == 0 else 0})
    for s, i in seq[rank * n // world_size:(rank + 1) * n // world_size]:
        if i in shards[s].flaw:
            skipped[shards[s].flaw[i]] += 1
        elif (s, i) in bad:
            skipped[bad[s, i]] += 1
        else:
            plan.append((s, i, frame_of(shards[s].keys[i], epoch)))
    return plan, +skipped


def write_indexes(d: Path, shards: list[ShardEntry], exts: list[str],
                  plan: list[tuple[int, int, int]]) -> tuple[list[str], list[str]]:
    """Index files under the new folder ``d`` for ``plan``, one per run of consecutive samples of
    one shard -> ``(paths, index_paths)`` for ``fn.readers.webdataset`` (read in that order)."""
    d.mkdir()
    paths, idx, groups = [], [], []
    for s, i, f in plan:
        path, _, prefix, off, size, _ = shards[s]
        if not paths or paths[-1] != path:
            paths.append(path)
            groups.append([])
        # the chosen frame under the extension "img": DALI reads and decodes only that JPEG
        cols = range(len(exts)) if f < 0 else (0, 1, 2 + f)
        groups[-1].append(" ".join(f"{exts[c] if f < 0 or c < 2 else 'img'} {off[i, c]} {size[i, c]} "
                                   f"{prefix[i]}{exts[c]}" for c in cols))
    for j, lines in enumerate(groups):
        idx.append(str(d / f"{j:06d}.idx"))
        Path(idx[-1]).write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return paths, idx
