"""Peak transient memory of one batched fbank call, float64 vs float32 compute (counted, not timed).

    python benchmarks/fbank_memory.py [--batch 256] [--seconds 10.24]

Runs :func:`tgdp.data.fbank.fbank` on the meta device (no data, instant) under a dispatch mode that
adds up the bytes of every tensor storage the call allocates while it is alive, and prints the peak.
This is the live-tensor peak a caching GPU allocator has to serve for the call (the input waveform
not included); the allocator's own rounding and fragmentation come on top.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tgdp.data.fbank import fbank


class LiveBytes(TorchDispatchMode):
    """Peak of the summed storage bytes of the tensors created inside the mode and still referenced."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}    # storage id -> live tensors on it
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.refs:
                    self.refs[key], self.size[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.size[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        return out


def peak_bytes(batch: int, samples: int, dtype: torch.dtype) -> int:
    wave = torch.empty(batch, samples, device="meta")
    lengths = torch.full((batch,), samples, dtype=torch.long)    # host lengths, as the loaders pass
    mode = LiveBytes()
    with mode:
        out = fbank(wave, lengths=lengths, check_finite=False, compute_dtype=dtype)
    del out
    return mode.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.24)
    a = ap.parse_args()
    n = int(round(a.seconds * 16000))
    print(f"fbank of {a.batch} clips x {n} samples (16 kHz), peak live tensor memory of the call:")
    for dtype in (torch.float64, torch.float32):
        print(f"  compute_dtype={str(dtype):14s} {peak_bytes(a.batch, n, dtype) / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
