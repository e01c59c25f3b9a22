"""Per-op FLOPs and HBM bytes, counted on the meta device (no memory, no compute).

:class:`OpCounter` is a ``TorchDispatchMode`` that sees every aten op and records, per op, its
FLOPs (``torch.utils.flop_counter``'s formulas: matmuls, convolutions, attention; other ops count
0, as in MFU), the bytes it reads and writes, and an op class:

==========  ==========================================================================================
matmul      mm / addmm / bmm / baddbmm / convolution and their backward
attention   SDPA / flash kernels (and FlashAttention stand-ins recorded by :mod:`tgdp.roofline`)
fused       fused kernels recorded by a caller with their own reads and writes (the Triton ops)
memory      everything else: elementwise, norms, reductions, gathers, casts, copies, cat
optimizer   every op of the "optimizer" and "ema" phases (fused Adam(W), the EMA lerp)
==========  ==========================================================================================

Bytes: every input tensor is read once (broadcast dimensions, stride 0, are not re-read), every
output and every tensor an op mutates is written; views, allocations and metadata cost nothing.
That is the traffic of running each aten op as its own kernel (eager). Under ``torch.compile``
Inductor fuses chains of memory-bound ops, so :attr:`Count.fused_memory_bytes` also gives the
*perfect-fusion* bound of the memory class: a tensor passed between two memory-bound ops of the same
phase stays on chip; only tensors entering from another class or phase, and tensors leaving to one,
touch HBM. The truth of a compiled step lies between the two.

:class:`MetaAutocast` applies CUDA's bf16 autocast dtype rules to meta tensors (the meta device has
no autocast), so the counted bytes are those of a GPU step.
"""


from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

__all__ = ["OP_CLASSES", "OpCounter", "Count", "MetaAutocast"]

OP_CLASSES = ("matmul", "attention", "fused", "memory", "optimizer")

_aten = torch.ops.aten
_MATMUL = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.addbmm, _aten.convolution,
           _aten._convolution, _aten.convolution_backward, _aten._scaled_mm}
_FREE = {_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided,
         _aten.lift_fresh, _aten.detach, _aten.alias, _aten._local_scalar_dense, _aten.set_, _aten.resize_}
# Arguments a schema marks mutable that the op only reads here (grads are unscaled in place only
# when a grad_scale is given, which the training step never passes).
_READ_ONLY = {(_aten._fused_adamw_, "grads"), (_aten._fused_adam_, "grads")}
# In-place ops that overwrite their target without reading it.
_OVERWRITE = {_aten.copy_, _aten.fill_, _aten.zero_, _aten.normal_, _aten.uniform_, _aten.random_,
              _aten.exponential_, _aten.bernoulli_}


def _read_bytes(t: Tensor) -> int:
    """Bytes an op reads from ``t``: broadcast (stride-0) dimensions are read once."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.numel() else 0
    return n * t.element_size()


def _write_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _region(t: Tensor) -> tuple:
    """Identity of the memory a tensor covers: (storage, offset, shape, stride)."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


@dataclass
class Count:
    """Per-class totals of one counted region. ``ops``: aten ops (= kernels, eager);
    ``fused_memory_bytes``: the memory class's bytes under perfect fusion (module doc)."""

    flops: dict = field(default_factory=lambda: dict.fromkeys(OP_CLASSES, 0))
    bytes: dict = field(default_factory=lambda: dict.fromkeys(OP_CLASSES, 0))
    ops: dict = field(default_factory=lambda: dict.fromkeys(OP_CLASSES, 0))
    fused_memory_bytes: int = 0
    fused_memory_kernels: int = 0
    by_op: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))   # name -> [n, flops, bytes]

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


class OpCounter(TorchDispatchMode):
    """Records FLOPs, bytes and class of every aten op (module doc). ``phase`` (set by the caller:
    "teacher", "student", "backward", "optimizer", "ema") bounds fusion: a tensor crossing phases
    is written to HBM. Ops in the "optimizer" and "ema" phases are class "optimizer"."""

    def __init__(self):
        super().__init__()
        self.count = Count()
        self.phase = "step"
        self._suspended = 0
        self._keep: list = []                      # storages stay alive: their ids are never reused
        self._writer: dict = {}                    # storage -> (is memory op, phase, version)
        self._pending: dict = {}                   # storage -> [bytes, phase, paid] of a memory op's write
        self._paid_reads: set = set()
        self._version = 0
        # one (phase, class, model FLOPs, executed FLOPs, bytes) per kernel
        self.calls: list[tuple[str, str, int, int, int]] = []
        self.phase_flops: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def suspended(self):
        """Ops inside are not recorded (the stand-ins' own allocations)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._suspended or func._overloadpacket in _FREE:
            return out
        packet = func._overloadpacket
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        in_storages = {t.untyped_storage()._cdata for t in ins}
        mutated = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write or (packet, arg.name) in _READ_ONLY:
                continue
            val = args[i] if i < len(args) else kwargs.get(arg.name)
            mutated += [t for t in tree_leaves(val) if isinstance(t, Tensor)]
        if not mutated and outs and all(t.untyped_storage()._cdata in in_storages for t in outs):
            return out                                              # a view: metadata only
        mutated_ids = {id(t) for t in mutated}
        reads = [t for t in ins if not (packet in _OVERWRITE and id(t) in mutated_ids)]
        writes = mutated + [t for t in outs if t.untyped_storage()._cdata not in in_storages]
        if packet in _MATMUL:
            cls = "matmul"
        elif "scaled_dot_product" in packet.__name__ or "flash_attention" in packet.__name__:
            cls = "attention"
        elif self.phase in ("optimizer", "ema"):
            cls = "optimizer"
        else:
            cls = "memory"
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        self.record(str(packet.__name__), cls, flops, reads, writes)
        return out

    def record(self, name: str, cls: str, flops: int, reads: list[Tensor], writes: list[Tensor],
               exec_flops: int | None = None) -> None:
        """Add one op (also called by the fused stand-ins with their kernels' tensors). ``flops``: model
        FLOPs (what MFU counts); ``exec_flops``: what the kernel executes, if more (recomputation)."""
        c = self.count
        seen, nbytes, fused = set(), 0, 0
        memory = cls == "memory"
        for t in reads:
            r = _region(t)
            if r in seen:
                continue
            seen.add(r)
            b = _read_bytes(t)
            nbytes += b
            key = r[0]
            w = self._writer.get(key)
            same = w is not None and w[0] and w[1] == self.phase
            pend = self._pending.get(key)
            if pend is not None and not pend[2] and not (memory and pend[1] == self.phase):
                pend[2] = True                     # a memory op's output leaves its fusion group
                c.fused_memory_bytes += pend[0]
            if memory and not same:
                tag = (r, None if w is None else w[2], self.phase)
                if tag not in self._paid_reads:
                    self._paid_reads.add(tag)
                    fused += b
        for t in writes:
            key = t.untyped_storage()._cdata
            b = _write_bytes(t)
            nbytes += b
            self._keep.append(t.untyped_storage())
            self._version += 1
            self._writer[key] = (memory, self.phase, self._version)
            if memory:
                self._pending[key] = [b, self.phase, False]
            else:
                self._pending.pop(key, None)
        c.fused_memory_bytes += fused
        if fused:
            c.fused_memory_kernels += 1   # a fusion group starts where it loads from outside itself
        self.calls.append((self.phase, cls, int(flops), int(flops if exec_flops is None else exec_flops), nbytes))
        self.phase_flops[self.phase] += int(flops)
        c.flops[cls] += int(flops)
        c.bytes[cls] += nbytes
        c.ops[cls] += 1
        row = c.by_op[f"{cls}:{name}"]
        row[0] += 1
        row[1] += int(flops)
        row[2] += nbytes


# ---------------------------------------------------------------------------------------------
# CUDA bf16 autocast on the meta device


def _floats(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's dtype rules (bf16) for meta tensors, at the torch-function level.

    Lower-precision ops (linear, matmul, conv, SDPA) get fp32 inputs cast to bf16; fp32 ops
    (layer/group norm, softmax, log-softmax, exp/log/pow/rsqrt, logsumexp, losses, norms, cumsum)
    get bf16 inputs cast to fp32; sum/prod/cumsum of bf16 accumulate into fp32. The casts are real
    ``_to_copy`` ops, so a counter below sees them in the forward and their backward. As autocast's
    cache does, a leaf tensor that requires grad (a student weight) is cast once per
    :meth:`new_step`; other tensors (teacher weights, activations) at every use.
    """

    LOW = {F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm,
           Tensor.bmm, torch.addmm, torch.baddbmm, torch.einsum, F.conv1d, F.conv2d, F.conv3d,
           F.scaled_dot_product_attention}
    FP32 = {F.layer_norm, torch.layer_norm, F.group_norm, F.softmax, Tensor.softmax, torch.softmax,
            F.log_softmax, Tensor.log_softmax, torch.log_softmax, torch.exp, Tensor.exp, torch.log,
            Tensor.log, torch.pow, Tensor.pow, Tensor.__pow__, torch.rsqrt, Tensor.rsqrt,
            torch.logsumexp, Tensor.logsumexp, F.mse_loss, F.cross_entropy, F.nll_loss, torch.norm,
            Tensor.norm, torch.linalg.vector_norm, torch.cumsum, Tensor.cumsum}
    ACCUMULATE = {torch.sum, Tensor.sum, torch.prod, Tensor.prod}

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, Tensor] = {}

    def new_step(self) -> None:
        self._cache.clear()

    def _low(self, x):
        if not _floats(x) or x.dtype != torch.float32:
            return x
        if x.is_leaf and x.requires_grad and torch.is_grad_enabled():
            if id(x) not in self._cache:
                self._cache[id(x)] = x.to(self.dtype)
            return self._cache[id(x)]
        return x.to(self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOW:
            args = [self._low(a) for a in args]
            kwargs = {k: self._low(v) for k, v in kwargs.items()}
        elif func in self.FP32:
            args = [a.float() if _floats(a) and a.dtype != torch.float64 else a for a in args]
        elif func in self.ACCUMULATE and args and _floats(args[0]) and args[0].dtype == self.dtype \
                and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)
