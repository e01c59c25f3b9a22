"""One training step of the fast model, counted op by op on the meta device (for :mod:`tgdp.perf`).

:func:`count_train_step` runs the real step (teacher forward, student forward on both views,
losses, backward; then the fused Adam(W) update and the EMA lerp) under
:class:`tgdp.opcount.OpCounter` and:

- emulates CUDA bf16 autocast (:class:`tgdp.opcount.MetaAutocast`), so tensor dtypes, and therefore
  bytes, are those of a GPU step: matmul inputs cast to bf16 (student weights once per step,
  teacher weights at every use, as autocast's cache does), layer norms and softmax in fp32;
- replaces ``varlen_attention`` by a fused-kernel stand-in with FlashAttention's reads and writes
  (fwd: Q, K, V -> O, LSE; bwd: Q, K, V, O, dO, LSE -> dQ, dK, dV, plus the fp32 dQ accumulator)
  instead of SDPA's L x L maps on the meta device, and the three :mod:`tgdp.ops` ops by stand-ins
  with their kernels' reads and writes (:func:`counting_standins`). Model FLOPs are counted as
  :func:`tgdp.flops.count_step_flops` counts them (attention backward = 2 x forward), so the totals
  agree; FlashAttention's backward also recomputes the scores, which the time model adds as executed
  FLOPs (2.5 x forward).

The guided top-k of the contrastive masks (B x N scores) is left out: the masks are given.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from tgdp.opcount import OP_CLASSES, Count, MetaAutocast, OpCounter

__all__ = ["count_train_step", "counting_standins", "Count", "OpCounter", "MetaAutocast", "OP_CLASSES"]

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
