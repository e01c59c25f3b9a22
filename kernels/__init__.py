"""Triton kernels behind ``tgdp.ops`` — the only package in tgdp that imports ``triton``.

Each op has one file: Triton kernels -> launchers (validate, pick blocks, launch) -> a
``torch.library.custom_op`` with a fake (meta) implementation and ``register_autograd`` (the op's
autograd.Function: it is what lets ``torch.compile(fullgraph=True)`` trace the op and
``torch.library.opcheck`` test it) -> the public function with the reference's signature.

Importing this package needs triton; ``tgdp.ops`` imports the op modules (``kernels.masked_mse``,
``kernels.patch_global_scores``, ``kernels.topk_visible``) lazily, only on the Triton path.
On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import os

import triton

# Under the interpreter every program is a Python call: fewer, larger programs keep tests fast,
# and bf16 ``tl.dot`` is broken there (triton-lang/triton#11584), so dots are done in fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


__all__ = ["INTERPRET", "next_pow2"]
