"""One gpucheck step in its own process: ``python -m tgdp.gpucheck.child MODULE[:FUNC] CONTEXT.json``.

Started by :mod:`tgdp.gpucheck.__main__` with a time limit. The step function gets a
:class:`~tgdp.gpucheck.common.Context` and returns ``{"status": "pass"|"fail", "summary", "details"}``;
an exception becomes ``"error"`` with the traceback's tail. The result is written atomically to
``context.result_path`` (progress notes are written there while the step runs).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    target, ctx_file = argv
    from tgdp.atomic import atomic_write_json
    from tgdp.gpucheck.common import Context

    ctx = Context.from_json(Path(ctx_file).read_text())
    if not ctx.smoke and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The parent removes it; refuse rather than "validate" the interpreter instead of sm_90 code.
        res = {"status": "error", "summary": "TRITON_INTERPRET is set: Triton would run its CPU interpreter "
               "instead of the compiled kernels; unset it", "details": {}}
    else:
        module, _, func = target.partition(":")
        try:
            res = getattr(importlib.import_module(module), func or "run")(ctx)
        except Exception as exc:  # noqa: BLE001 - any failure of a step is reported, never fatal
            tb = traceback.format_exc()
            res = {"status": "error", "summary": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                   "details": {"traceback": tb[-6000:]}}
            print(tb, file=sys.stderr)
    atomic_write_json(ctx.result_path, res)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is on disk: skip interpreter teardown (DALI threads, compile worker pools), which
    # must not be able to hang the step past its limit.
    os._exit(code)
