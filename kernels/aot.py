"""Compile the Triton kernels ahead of time for a GPU this machine does not have.

Triton compiles without a device once its driver reports a target. :func:`compiling_for` makes the
active driver a :class:`TargetDriver` (an H100, ``GPUTarget("cuda", 90, 32)``, by default) and
turns every :func:`tgdp.kernels.launch` into a compile-only call (``warmup=True``): the real
launchers run on CPU tensors of the real shapes (validation, block and warp choice, grid) and
Triton builds the cubin they would launch. ptxas (shipped in the triton wheel, run with ``-v``)
reports the stack frame and spill bytes, and ``cuobjdump --dump-resource-usage`` reads REG, STACK
and LOCAL from the cubin itself.

``python -m tgdp.kernels.aot [--batch 256] [--json FILE]`` compiles every kernel behind
``tgdp.ops`` at ``paper()`` shapes in fp32, bf16 and fp16 with every variant flag, prints one line
per compiled kernel and exits 1 when any of them spills. It needs ``TRITON_INTERPRET`` unset (the
interpreter replaces the compiler) and the ptxas log needs a cold Triton cache (``TRITON_CACHE_DIR``
pointing at an empty folder); a cached cubin is still checked through cuobjdump.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import tgdp.kernels as K
from tgdp.atomic import atomic_write_json
from tgdp.cli import UserError, parser, run
from tgdp.kernels.aot_variants import Variant, paper_variants

__all__ = ["H100", "Compiled", "Session", "TargetDriver", "compile_variants", "compiling_for",
           "parse_ptxas_log", "parse_resource_usage", "resource_usage"]

H100 = GPUTarget("cuda", 90, 32)


class TargetDriver:
    """The part of Triton's driver interface that compiling needs: it reports ``target`` and never
    touches a device. Its device is a name of its own, so kernels compiled here never share a cache
    entry with kernels compiled for a real device in the same process."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> str:
        return f"aot:{self.target.backend}:{self.target.arch}"

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled kernel of one variant and what it costs on the target."""

    variant: str
    kernel: str
    meta: dict                           # constexpr flags and block sizes, num_warps
    registers: int                       # cuobjdump REG
    stack: int                           # cuobjdump STACK: bytes of stack frame per thread
    local: int                           # cuobjdump LOCAL
    spill_stores: int | None             # ptxas -v; None when the cubin came from Triton's cache
    spill_loads: int | None
    shared: int                          # bytes of shared memory the launch asks for
    cubin_hash: str                      # equal hashes = one cubin (a repeated specialisation)
    seconds: float                       # compile time in this process (~0 when cached)

    @property
    def spills(self) -> bool:
        return bool(self.stack or self.local or self.spill_stores or self.spill_loads)


def parse_ptxas_log(log: str) -> dict[str, int]:
    """ptxas -v output -> {"stack", "spill_stores", "spill_loads", "registers"} ({} if absent)."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if frame is None or regs is None:
        return {}
    stack, stores, loads = (int(x) for x in frame.groups())
    return {"stack": stack, "spill_stores": stores, "spill_loads": loads, "registers": int(regs.group(1))}


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` of a cubin -> {function: {"REG": n, "STACK": n, ...}}."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return parse_resource_usage(out)


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    usage = {}
    for name, line in re.findall(r"Function (\S+):\s*\n\s*(.*)", text):
        usage[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
    return usage


@dataclasses.dataclass
class Session:
    """What :func:`compiling_for` yields: the results so far, labelled with ``variant``."""

    target: GPUTarget
    results: list[Compiled] = dataclasses.field(default_factory=list)
    variant: str = ""


@contextlib.contextmanager
def compiling_for(target: GPUTarget = H100) -> Iterator[Session]:
    """Inside the block every kernel launch compiles for ``target`` instead of running, and adds a
    :class:`Compiled` to the yielded session's ``results``."""
    if K.INTERPRET:
        raise RuntimeError("tgdp.kernels.aot: TRITON_INTERPRET=1 replaces the compiler; "
                           "unset it to compile ahead of time")
    if K._compile_hook is not None:
        raise RuntimeError("tgdp.kernels.aot: compiling_for() does not nest")
    session = Session(target)
    ptxas: dict[str, dict[str, int]] = {}          # per cubin hash: a repeated launch reuses the cubin
    usage: dict[str, dict[str, int]] = {}

    def hook(kernel, grid, args, meta):
        log, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stdout(log):    # Triton prints the ptxas -v log when asked to
            compiled = kernel.run(*args, grid=grid, warmup=True, **meta)
        seconds = time.perf_counter() - start
        name = kernel.fn.__name__
        if compiled.hash not in ptxas:
            ptxas[compiled.hash] = parse_ptxas_log(log.getvalue())
            usage[compiled.hash] = resource_usage(compiled.asm["cubin"])[name]
        info, res = ptxas[compiled.hash], usage[compiled.hash]
        session.results.append(Compiled(session.variant, name, dict(meta), res["REG"], res["STACK"],
                                        res.get("LOCAL", 0), info.get("spill_stores"),
                                        info.get("spill_loads"), compiled.metadata.shared, compiled.hash,
                                        seconds))

    previous_driver, previous_log = driver._active, knobs.nvidia.dump_ptxas_log
    driver.set_active(TargetDriver(target))
    knobs.nvidia.dump_ptxas_log = True
    K._compile_hook = hook
    try:
        yield session
    finally:
        K._compile_hook = None
        knobs.nvidia.dump_ptxas_log = previous_log
        driver._active = previous_driver           # no public way back to "not created yet"


def compile_variants(variants: list[Variant], target: GPUTarget = H100,
                     progress: Callable[[Compiled], None] | None = None) -> list[Compiled]:
    """Run each variant's calls through the real launchers, compiling for ``target``."""
    with compiling_for(target) as session:
        for v in variants:
            session.variant = v.name
            start = len(session.results)
            v.run()
            if progress is not None:
                for c in session.results[start:]:
                    progress(c)
    return session.results


def _main(argv: list[str] | None = None) -> int:
    ap = parser("tgdp.kernels.aot", __doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="batch of the paper() shapes (default: 256)")
    ap.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="compile only variants I, I+N, I+2N, ... (run N processes side by side)")
    args = ap.parse_args(argv)
    shard = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if shard is None or not int(shard[1]) < int(shard[2]):
        raise UserError(f"--shard {args.shard!r} must be I/N with 0 <= I < N, e.g. 0/2")
    i, n = int(shard[1]), int(shard[2])
    if args.batch < 1:
        raise UserError(f"--batch {args.batch} must be >= 1 (the paper() shapes' batch; default 256)")
    if K.INTERPRET:
        raise UserError("TRITON_INTERPRET=1 is set, so Triton would interpret instead of compiling; "
                        "run without it (env -u TRITON_INTERPRET python -m tgdp.kernels.aot)")

    def show(c: Compiled) -> None:
        spill = "SPILL" if c.spills else "ok"
        print(f"{spill:5s} {c.kernel:24s} regs {c.registers:3d} stack {c.stack:4d} "
              f"spill st/ld {c.spill_stores}/{c.spill_loads} smem {c.shared:6d}  {c.variant}", flush=True)

    results = compile_variants(paper_variants(args.batch)[i::n], progress=show)
    spilled = [c for c in results if c.spills]
    print(f"{len(results)} launches, {len({c.cubin_hash for c in results})} distinct cubins of "
          f"{len({c.kernel for c in results})} kernels compiled for sm_{H100.arch}: {len(spilled)} spill; "
          f"at most {max((c.registers for c in results), default=0)} registers and "
          f"{max((c.shared for c in results), default=0)} bytes of shared memory")
    if args.json:
        atomic_write_json(args.json, [dataclasses.asdict(c) for c in results], indent=1)
    return 1 if spilled else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.kernels.aot``: expected errors are one line and exit status 2."""
    return run("tgdp.kernels.aot", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
