"""Per-op FLOPs and HBM bytes of one training step, counted on the meta device (no memory, no compute).

:class:`OpCounter` is a ``TorchDispatchMode`` that sees every aten op of a step and records, per op,
its FLOPs (``torch.utils.flop_counter``'s formulas: matmuls, convolutions, attention; other ops
count 0, as in MFU), the bytes it reads and writes, and an op class:

==========  ==========================================================================================
matmul      mm / addmm / bmm / baddbmm / convolution and their backward
attention   FlashAttention varlen forward / backward, counted as ONE fused kernel each (see below)
fused       the Triton ops of :mod:`tgdp.ops`, counted as their kernels' reads and writes
memory      everything else: elementwise, norms, reductions, gathers, casts, copies, cat
optimizer   the fused Adam(W) step and the EMA teacher's foreach lerp
==========  ==========================================================================================

Bytes: every input tensor is read once (broadcast dimensions, stride 0, are not re-read), every
output and every tensor an op mutates is written; views, allocations and metadata cost nothing.
That is the traffic of running each aten op as its own kernel (eager). Under ``torch.compile``
Inductor fuses chains of memory-bound ops, so :attr:`Count.fused_memory_bytes` also gives the
*perfect-fusion* bound of the memory class: a tensor passed between two memory-bound ops of the same
phase stays on chip; only tensors entering from another class or phase, and tensors leaving to one,
touch HBM. The truth of a compiled step lies between the two.

:func:`count_train_step` runs the fast model's real training step (teacher forward, student
forward on both views, losses, backward; then Adam(W) and the EMA lerp) under the counter and:

- emulates CUDA bf16 autocast (:class:`MetaAutocast`: the meta device has no autocast), so tensor
  dtypes, and therefore bytes, are those of a GPU step: matmul inputs cast to bf16 (student weights
  once per step, teacher weights at every use, as autocast's cache does), layer norms and softmax
  in fp32;
- replaces ``varlen_attention`` by a fused-kernel stand-in with FlashAttention's reads and writes
  (fwd: Q, K, V -> O, LSE; bwd: Q, K, V, O, dO, LSE -> dQ, dK, dV, plus the fp32 dQ accumulator)
  instead of SDPA's L x L maps on the meta device, and the three :mod:`tgdp.ops` ops by stand-ins
  with their kernels' reads and writes. Model FLOPs are counted as :func:`tgdp.flops.count_step_flops`
  counts them (attention backward = 2 x forward), so the totals agree; FlashAttention's backward
  also recomputes the scores, which the time model adds as executed FLOPs (2.5 x forward).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

__all__ = ["OP_CLASSES", "OpCounter", "Count", "MetaAutocast", "count_train_step"]

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


# ---------------------------------------------------------------------------------------------
# Fused-kernel stand-ins: one recorded op per kernel, with the kernel's reads and writes


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention varlen: fwd reads Q, K, V and writes O and the fp32 LSE [H, total]; bwd reads
    Q, K, V, O, dO, LSE and writes dQ, dK, dV, with fp32 scratch it writes and reads back (the
    rowsum(dO * O) delta [H, total] and the dQ accumulator [total, H, d])."""

    @staticmethod
    def forward(ctx, q, k, v, counter: OpCounter, flops: int):
        with counter.suspended():
            o = torch.empty_like(q)
            lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
        counter.record("flash_attn_varlen_fwd", "attention", flops, [q, k, v], [o, lse])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.counter, ctx.flops = counter, flops
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        counter = ctx.counter
        with counter.suspended():
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            delta = torch.empty_like(lse)
            dq_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        # model FLOPs: dV, dP, dQ, dK = 2 x forward (as tgdp.flops counts SDPA on meta); the
        # kernel also recomputes the scores: 2.5 x forward executed
        counter.record("flash_attn_varlen_bwd", "attention", 2 * ctx.flops,
                       [q, k, v, o, do, lse, delta, dq_acc], [dq, dk, dv, delta, dq_acc],
                       exec_flops=ctx.flops * 5 // 2)
        return dq, dk, dv, None, None


def _attention_standin(counter: OpCounter):
    def varlen_attention(q, k, v, meta, *, scale, backend="sdpa", return_lse=False):
        """Same contract as :func:`tgdp.model.attention.varlen_attention`, counted as FlashAttention."""
        h, d = q.shape[1], q.shape[2]
        flops = sum(4 * g.count * g.length * g.length * h * d for g in meta.groups)
        o, lse = _FlashVarlen.apply(q, k, v, counter, flops)
        return o, (lse if return_lse else None)
    return varlen_attention


class _MaskedMSE(torch.autograd.Function):
    """kernels/masked_mse.py: fwd reads pred, the image patches, mask and writes fp32 per-patch
    partials + the loss; bwd reads them again (the target is recomputed) and writes grad_pred."""

    @staticmethod
    def forward(ctx, pred, imgs, mask, counter: OpCounter):
        with counter.suspended():
            partial = torch.empty(mask.shape, device=pred.device, dtype=torch.float32)
            loss = torch.empty((), device=pred.device, dtype=torch.float32)
        counter.record("masked_mse_fwd", "fused", 0, [pred, imgs, mask], [partial, loss])
        ctx.save_for_backward(pred, imgs, mask)
        ctx.counter = counter
        return loss

    @staticmethod
    def backward(ctx, grad):
        pred, imgs, mask = ctx.saved_tensors
        with ctx.counter.suspended():
            dpred = torch.empty_like(pred)
        ctx.counter.record("masked_mse_bwd", "fused", 0, [pred, imgs, mask, grad], [dpred])
        return dpred, None, None, None


class _TopkVisible(torch.autograd.Function):
    """kernels/topk_visible.py: fwd reads the scores and the k kept token rows, writes ids_keep,
    ids_restore, mask and the visible tokens; bwd scatters grad_visible into grad_tokens."""

    @staticmethod
    def forward(ctx, scores, tokens, k: int, counter: OpCounter):
        b, n = scores.shape
        with counter.suspended():
            ids_keep = torch.empty(b, k, device=scores.device, dtype=torch.long)
            ids_restore = torch.empty(b, n, device=scores.device, dtype=torch.long)
            mask = torch.empty(b, n, device=scores.device, dtype=torch.float32)
            visible = None if tokens is None else tokens.new_empty(b, k, tokens.shape[-1])
            kept = None if tokens is None else tokens.new_empty(b, k, tokens.shape[-1])   # rows read
        reads = [scores] + ([] if kept is None else [kept])
        writes = [ids_keep, ids_restore, mask] + ([] if visible is None else [visible])
        counter.record("topk_visible_fwd", "fused", 0, reads, writes)
        ctx.save_for_backward(ids_keep)
        ctx.counter, ctx.shape = counter, None if tokens is None else tokens.shape
        ctx.mark_non_differentiable(ids_keep, ids_restore, mask)
        return ids_keep, ids_restore, mask, visible

    @staticmethod
    def backward(ctx, _a, _b, _c, grad_visible):
        if grad_visible is None or ctx.shape is None:
            return None, None, None, None
        (ids_keep,) = ctx.saved_tensors
        with ctx.counter.suspended():
            grad_tokens = grad_visible.new_empty(ctx.shape)
        ctx.counter.record("topk_visible_bwd", "fused", 0, [grad_visible, ids_keep], [grad_tokens])
        return None, grad_tokens, None, None


def _ops_standins(counter: OpCounter) -> dict:
    def patch_global_scores(q, k, lse=None, *, scale, global_index=0, renormalize=False,
                            direction="patch_to_cls"):
        b, h, l, d = q.shape
        with counter.suspended():
            out = torch.empty(b, l - 1, device=q.device, dtype=torch.float32)
        if lse is not None and direction == "patch_to_cls":
            # one pass: q . k_G - lse (the reference's FLOPs: one dot per query row and head)
            reads, flops = [q, k[:, :, global_index], lse], 2 * b * h * l * d
        else:
            # online softmax over all keys, then the global column
            reads, flops = [q, k] + ([] if lse is None else [lse]), 2 * b * h * l * l * d + 2 * b * h * l * d
        counter.record("patch_global_scores", "fused", flops, reads, [out])
        return out

    def masked_mse(pred, imgs, mask, patch_size, norm_pix=False):
        return _MaskedMSE.apply(pred, imgs, mask, counter)

    def topk_visible(scores, k, tokens=None):
        return _TopkVisible.apply(scores, tokens, k, counter)

    return {"patch_global_scores": patch_global_scores, "masked_mse": masked_mse, "topk_visible": topk_visible}


@contextlib.contextmanager
def _swapped(originals: dict, replacements: dict):
    """Point every ``tgdp`` module attribute bound to ``originals[name]`` at ``replacements[name]``."""
    done = []
    try:
        for mod in [m for n, m in list(sys.modules.items()) if n == "tgdp" or n.startswith("tgdp.")]:
            for name, orig in originals.items():
                if getattr(mod, name, None) is orig:
                    setattr(mod, name, replacements[name])
                    done.append((mod, name, orig))
        yield
    finally:
        for mod, name, orig in done:
            setattr(mod, name, orig)


@contextlib.contextmanager
def counting_standins(counter: OpCounter):
    """FlashAttention and the Triton ops as single recorded kernels (module doc)."""
    from tgdp import ops
    from tgdp.model import attention

    originals = {"varlen_attention": attention.varlen_attention,
                 **{n: getattr(ops, n) for n in ("patch_global_scores", "masked_mse", "topk_visible")}}
    with _swapped(originals, {"varlen_attention": _attention_standin(counter), **_ops_standins(counter)}):
        yield


# ---------------------------------------------------------------------------------------------
# One training step


def _meta_masks(batch: int, n: int, ratio: float, seed: int):
    from tgdp.masking import Masks, random_masks

    m = random_masks(batch, n, ratio, torch.Generator().manual_seed(seed))   # drawn on CPU, values irrelevant
    return Masks(m.ids_keep.to("meta"), m.ids_restore.to("meta"), m.mask.to("meta"))


def count_train_step(cfg, batch: int, *, autocast: bool = True) -> tuple[Count, dict]:
    """Count one fast-model training step of ``cfg`` at ``batch`` samples on the meta device.

    Returns (:class:`Count` of the step, ``info``): ``info["phase_flops"]`` FLOPs per phase
    ("teacher", "student", "backward", "optimizer", "ema"), ``info["grad_bytes"]`` bytes of the
    gradients a data-parallel step all-reduces (fp32) in ``info["grad_tensors"]`` tensors,
    ``info["params"]`` trainable parameters,
    ``info["calls"]`` one ``(phase, class, model FLOPs, executed FLOPs, bytes)`` per recorded kernel.
    """
    from tgdp.method import TGDP
    from tgdp.model.fast import FastCAVMAESync

    if batch < 1:
        raise ValueError(f"batch={batch!r} must be >= 1")
    m, mc = cfg.model, cfg.masking
    model = FastCAVMAESync(m, device="meta")
    method = TGDP(cfg, model, check_finite=False)
    audio = torch.zeros(batch, m.audio_length, m.n_mels, device="meta")
    frames = torch.zeros(batch, m.in_chans, m.img_size, m.img_size, device="meta")
    rec = (_meta_masks(batch, m.num_patches_a, mc.rec_ratio, 0), _meta_masks(batch, m.num_patches_v, mc.rec_ratio, 1))
    con = (_meta_masks(batch, m.num_patches_a, mc.con_ratio, 2), _meta_masks(batch, m.num_patches_v, mc.con_ratio, 3))
    counter = OpCounter()
    teacher = method.teacher.module
    teacher_forward = teacher.teacher_forward

    def phased_teacher(*args, **kwargs):
        counter.phase = "teacher"
        try:
            return teacher_forward(*args, **kwargs)
        finally:
            counter.phase = "student"

    teacher.teacher_forward = phased_teacher
    params = [p for p in method.student.parameters() if p.requires_grad]
    amp = MetaAutocast() if autocast else contextlib.nullcontext()
    with counting_standins(counter), counter:
        counter.phase = "student"
        with amp:
            out = method(audio, frames, masks_rec=rec, masks_con=con)
        counter.phase = "backward"
        out.loss.backward()
        counter.phase = "optimizer"
        with_grad = [p for p in params if p.grad is not None]
        with counter.suspended():
            state = [[torch.zeros_like(p) for p in with_grad] for _ in range(2)]
            steps = [torch.zeros((), device="meta") for _ in with_grad]
        t = cfg.train
        torch._fused_adamw_(with_grad, [p.grad for p in with_grad], state[0], state[1], [], steps,
                            lr=t.lr, beta1=t.betas[0], beta2=t.betas[1], weight_decay=t.weight_decay,
                            eps=1e-8, amsgrad=False, maximize=False)
        counter.phase = "ema"
        names = [n for n, _ in method.student.named_parameters()]
        t_params = dict(teacher.named_parameters())
        s_params = dict(method.student.named_parameters())
        torch._foreach_lerp_([t_params[n] for n in names], [s_params[n] for n in names], 1.0 - cfg.teacher.momentum)
    info = {"phase_flops": dict(counter.phase_flops), "calls": counter.calls,
            "grad_bytes": sum(p.numel() * 4 for p in with_grad), "grad_tensors": len(with_grad),
            "params": sum(p.numel() for p in params)}
    return counter.count, info
