"""Atomic file writes: readers see either the old file or the complete new one, never a torn one.

Every writer in tgdp (checkpoints, shard indexes and manifests, reports, features, plots, converted
checkpoints) goes through :func:`atomic_write_bytes`: the data goes to a temporary file in the same
folder, is fsync'ed, ``os.replace``'d onto the final name, and the folder is fsync'ed. Temporary
names are ``.tmp-<name>.<pid>.tmp``: they start with :data:`TMP_PREFIX` and end with ``.tmp``, so a
folder's stale leftovers from a killed writer can be found with either pattern.

A write that fails (disk full, permission, quota) removes its temporary and raises an ``OSError``
whose ``filename`` is the *final* path, so the one error line names the file the user asked for
(:func:`tgdp.cli.format_os_error`); the previous file under that name is untouched.
:func:`check_writable` probes a folder before a long computation whose results go there.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TMP_PREFIX", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "check_writable"]

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


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass   # the folder itself is gone or unusable: nothing was left in it


def _with_path(exc: OSError, path: Path) -> OSError:
    """The same error (errno, message) naming ``path`` instead of a temporary or nothing."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parent folders created); returns the path.

    On failure the temporary is removed and an ``OSError`` naming ``path`` is raised.
    """
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # A crash before this rename leaves only the temporary; its owner removes stale ones on start.
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise _with_path(exc, path) from exc
    except BaseException:   # KeyboardInterrupt mid-write: no torn temporary either
        _discard(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents) and prove a file can be written, synced and removed there.

    Raises the ``OSError`` of the failing step (``PermissionError``, ``NotADirectoryError``,
    ``ENOSPC`` ...) naming the folder. Call it at start, before work whose results go to ``folder``.
    Note: a process running as root passes permission bits anyway; what is refused is refused here.
    """
    folder = Path(folder).expanduser()
    probe = folder / f"{TMP_PREFIX}probe.{os.getpid()}.tmp"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"tgdp")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        _discard(probe)
        raise _with_path(exc, folder) from exc
    return folder


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
