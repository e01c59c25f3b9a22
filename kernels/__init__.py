"""Triton kernels behind ``tgdp.ops`` — the only package in tgdp that imports ``triton``.

The folder is ``kernels/`` in the repository and installs as ``tgdp.kernels`` (setup.py maps it; in
a source checkout ``tgdp/kernels`` is a symlink to it), so it is always imported as ``tgdp.kernels``.

Each op has one file: Triton kernels -> launchers (validate, pick blocks, launch) -> a
``torch.library.custom_op`` with a fake (meta) implementation and ``register_autograd`` (the op's
autograd.Function: it is what lets ``torch.compile(fullgraph=True)`` trace the op and
``torch.library.opcheck`` test it) -> the public function with the reference's signature.

Every launcher launches through :func:`launch`, so the configuration it picks can be recorded
(:func:`record_launches`) and ``tgdp.kernels.aot`` can compile it for a GPU instead of running it.
Importing this package needs triton; ``tgdp.ops`` imports the op modules lazily, only on the Triton
path. On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set before triton is
imported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import triton

# Under the interpreter every program is a Python call: fewer, larger programs keep tests fast,
# and bf16 ``tl.dot`` is broken there (triton-lang/triton#11584), so dots are done in fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_gpu_config_depth = 0
_recorders: list[list[Launch]] = []
# Set by tgdp.kernels.aot while it compiles: called instead of launching.
_compile_hook: Callable[[Any, tuple[int, ...], tuple, dict], Any] | None = None


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def interpreter_blocks() -> bool:
    """True when launchers pick the interpreter's block sizes (few, large programs), False when they
    pick the ones a GPU launch uses (always off the interpreter; inside :func:`gpu_launch_config`)."""
    return INTERPRET and _gpu_config_depth == 0


@contextlib.contextmanager
def gpu_launch_config() -> Iterator[None]:
    """Make the launchers pick their GPU block sizes and warps even under the interpreter, so
    interpreter tests run the multi-block paths (online softmax over several key blocks, rank loops
    over several tiles) that a GPU runs. Numerics that the interpreter cannot do (bf16 ``tl.dot``)
    still follow :data:`INTERPRET`."""
    global _gpu_config_depth
    _gpu_config_depth += 1
    try:
        yield
    finally:
        _gpu_config_depth -= 1


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher chose it."""

    kernel: str                          # the @triton.jit function's name
    grid: tuple[int, ...]
    meta: dict[str, Any]                 # constexpr flags and block sizes, num_warps


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Collect every :class:`Launch` made inside the block (in order)."""
    calls: list[Launch] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``: the one launch point of every launcher."""
    for calls in _recorders:
        calls.append(Launch(kernel.fn.__name__, tuple(grid), dict(meta)))
    if _compile_hook is not None:
        _compile_hook(kernel, tuple(grid), args, meta)
        return
    kernel[grid](*args, **meta)


__all__ = ["INTERPRET", "Launch", "gpu_launch_config", "interpreter_blocks", "launch", "next_pow2",
           "record_launches"]
