"""The one error path of every ``python -m tgdp.<cmd>`` command, and its argument parser.

An *expected* failure — a bad config value, a mistyped flag, a missing or unreadable file, a corrupt
checkpoint, a full disk, data that yields nothing — is the user's to fix, so it is reported as one
line on stderr, ``tgdp.<cmd>: error: <what>, <where>, <what to do>``, and the command exits with
status 2. Anything else is a bug in tgdp and keeps its traceback. ``--debug`` (anywhere on the
command line) or ``TGDP_DEBUG=1`` shows the traceback of expected failures too.

Commands build their parser with :func:`parser` (usage mistakes become the same one line, help
texts render without reST markup), raise :class:`UserError` (or let
:class:`~tgdp.configs.ConfigError`, :class:`~tgdp.training.checkpoint.CheckpointError` and the
``OSError`` family propagate) and run their ``main`` with :func:`run`. This module imports no torch:
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from typing import Callable, Iterable, Iterator, Sequence

from tgdp.config_io import ConfigError

__all__ = ["UserError", "DataError", "run", "debug_enabled", "format_os_error", "fold", "clean_doc", "parser",
           "HelpFormatter", "writing_to"]


class UserError(Exception):
    """An expected failure the user can fix; the message says what, where and what to do."""


class DataError(UserError, ValueError):
    """Data that cannot serve the request: an empty split, fewer clips than one batch needs.

    A ``ValueError`` too, for library callers that catch bad input that way."""


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("TGDP_DEBUG", "") not in ("", "0")


def format_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: what failed, on which path, and what to do."""
    path = exc.filename if exc.filename is not None else "(path not known)"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free space or choose another folder"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}; free space or choose another folder"
    if exc.errno == errno.EROFS:
        return f"read-only file system: {path}; choose a writable folder"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {path}; check the path"
    if isinstance(exc, PermissionError):
        return f"permission denied: {path}; fix its permissions or choose another path"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder, a file was expected; give a file path"
    if isinstance(exc, NotADirectoryError):
        return f"{path} (or a parent) is a file, a folder was expected; give a folder path"
    if isinstance(exc, FileExistsError):
        return f"{path} already exists; choose another path"
    why = exc.strerror or str(exc) or type(exc).__name__
    return f"{why}: {path}; check the path and the device"


@contextlib.contextmanager
def writing_to(path) -> Iterator[None]:
    """Name ``path`` in an ``OSError`` that names no file (a write or fsync failing with ENOSPC or
    EIO carries none), so the one-line error says where: ``with writing_to(args.out): ...``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def fold(items: Iterable, first: int = 3) -> str:
    """A long list as one short phrase: ``"2 (a, b)"``, ``"1200 (first 3: a, b, c)"``."""
    items = [str(x) for x in items]
    shown = ", ".join(items[:first])
    return f"{len(items)} ({shown})" if len(items) <= first else f"{len(items)} (first {first}: {shown}, ...)"


_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc):`~?([^`]+)`")


def clean_doc(text: str | None) -> str:
    """Docstring text for ``--help``: roles and double backticks removed, ``:func:`a.b``` -> ``a.b``."""
    text = _ROLE.sub(r"\1", text or "")
    return text.replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's own line breaks (examples) and appends ``(default: X)`` to an option's
    help only when the default means something and the help does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, False, "",
                                                                                   argparse.SUPPRESS):
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors become the one-line error path
        raise UserError(f"{message}; see {self.prog} --help")


def parser(prog: str, doc: str | None, epilog: str | None = None, **kw) -> argparse.ArgumentParser:
    """The argument parser of ``python -m <prog>``: description = ``doc`` cleaned of reST markup,
    usage errors raise :class:`UserError`, help shows meaningful defaults. Subparsers inherit it."""
    return _Parser(prog=f"python -m {prog}", description=clean_doc(doc).strip() or None,
                   epilog=clean_doc(epilog).strip() or None, formatter_class=HelpFormatter,
                   allow_abbrev=False, **kw)


def _expected() -> tuple[type, ...]:
    kinds: list[type] = [UserError, ConfigError, OSError]
    ck = sys.modules.get("tgdp.training.checkpoint")  # loaded only where checkpoints are read
    if ck is not None and hasattr(ck, "CheckpointError"):
        kinds.append(ck.CheckpointError)
    return tuple(kinds)


_UNSAFE = re.compile(r"weights.only", re.IGNORECASE)


def _scrub(msg: str) -> str:
    """Never pass on advice to unpickle with ``weights_only=False`` (it runs code from the file):
    every sentence that mentions it is dropped, and what tgdp does instead is said."""
    if not _UNSAFE.search(msg):
        return msg
    kept = [s for s in re.split(r"(?<=[.;:])\s+", msg) if not _UNSAFE.search(s)]
    head = " ".join(kept).strip(" .;:")
    return (f"{head + ': ' if head else ''}the file holds objects other than tensors, which tgdp refuses to "
            "unpickle (that could run code from the file); use a checkpoint with tensors only")


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(prog: str, main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` (``--debug`` removed) and turn expected failures into one line + exit 2.

    ``prog`` is the command's name as the user typed it after ``python -m``, e.g. ``"tgdp.train"``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not isinstance(exc, _expected()):
            raise
        if isinstance(exc, ConfigError):
            msg = f"config error: {exc}"
        elif isinstance(exc, OSError) and not isinstance(exc, UserError):
            msg = format_os_error(exc)
        else:
            msg = str(exc)
        _close_bars()
        sys.stdout.flush()
        print(f"{prog}: error: {_one_line(_scrub(msg))}", file=sys.stderr, flush=True)
        return 2


def _close_bars() -> None:
    """Close progress bars the failure left open, so the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):  # tqdm's registry of open bars (a WeakSet)
        bar.close()
