"""The one error path of every ``python -m tgdp.<cmd>`` command.

An *expected* failure — a bad config value, a missing or unreadable file, a corrupt checkpoint, a
full disk, data that yields nothing — is the user's to fix, so it is reported as one line on stderr,
``tgdp.<cmd>: error: <what>, <where>, <what to do>``, and the command exits with status 2. Anything
else is a bug in tgdp and keeps its traceback. ``--debug`` (anywhere on the command line) or
``TGDP_DEBUG=1`` shows the traceback of expected failures too.

Commands raise :class:`UserError` (or let :class:`~tgdp.configs.ConfigError` and the ``OSError``
family propagate) and wrap their ``main`` with :func:`run`.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

__all__ = ["UserError", "run", "debug_enabled", "format_os_error"]


class UserError(Exception):
    """An expected failure the user can fix; the message says what, where and what to do."""


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("TGDP_DEBUG", "") not in ("", "0")


def format_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: what failed, on which path, and what to do."""
    path = exc.filename if exc.filename is not None else "?"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free space or choose another folder"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}; free space or choose another folder"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {path}; check the path"
    if isinstance(exc, PermissionError):
        return f"permission denied: {path}; fix its permissions or choose another path"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder, a file was expected; give a file path"
    if isinstance(exc, NotADirectoryError):
        return f"{path} (or a parent) is a file, a folder was expected; give a folder path"
    why = exc.strerror or str(exc)
    return f"{why}: {path}"


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(prog: str, main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` (``--debug`` removed) and turn expected failures into one line + exit 2.

    ``prog`` is the command's name as the user typed it after ``python -m``, e.g. ``"tgdp.train"``.
    """
    from tgdp.configs import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UserError, ConfigError, OSError) as exc:
        if debug:
            raise
        if isinstance(exc, ConfigError):
            msg = f"config error: {exc}"
        elif isinstance(exc, OSError) and not isinstance(exc, UserError):
            msg = format_os_error(exc)
        else:
            msg = str(exc)
        print(f"{prog}: error: {_one_line(msg)}", file=sys.stderr)
        return 2
