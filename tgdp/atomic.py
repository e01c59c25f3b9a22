"""Atomic file writes: readers see either the old file or the complete new one, never a torn one.

Every writer in tgdp (checkpoints, shard indexes and manifests, reports, features, plots, converted
checkpoints) goes through :func:`atomic_write_bytes`: the data goes to a temporary file in the same
folder, is fsync'ed, ``os.replace``'d onto the final name, and the folder is fsync'ed. Temporary
names are ``.tmp-<name>.<pid>.tmp``: they start with :data:`TMP_PREFIX` and end with ``.tmp``, so a
folder's stale leftovers from a killed writer can be found with either pattern.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TMP_PREFIX", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)  # a full disk must not also keep a partial temporary
        except OSError:
            pass
        if exc.filename is None:      # write/fsync errors (ENOSPC, EIO) carry no path: name the target
            exc.filename = str(path)
        raise
    # A crash before this rename leaves only the temporary; its owner removes stale ones on start.
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """JSON (UTF-8, non-ASCII kept) plus a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` serialised in memory first, then written atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())
