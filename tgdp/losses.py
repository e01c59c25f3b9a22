"""TG-DP losses on the global (CLS) embeddings (spec §4.2, §4.3).

- :func:`info_nce`: InfoNCE on L2-normalised embeddings with a fixed temperature. Unidirectional
  (official local loss and the paper's eq. 4: for each video, softmax over the audio axis) or symmetric
  (mean of both directions). With an initialised process group and ``gather=True``, negatives come
  from every rank through an all-gather *with autograd* (of the keys a direction uses: the audio rows
  for video->audio, the video rows too only when symmetric) and the targets are offset by ``rank * B``.
- :func:`distill_mse`: ``||g - g_teacher||^2`` summed over channels, mean over the batch, summed over
  the two modalities: the paper's eq. 6 with ``normalize=False`` (``paper()``); ``tgdp()`` first
  L2-normalises both globals (the space the contrastive loss and retrieval use).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce", "distill_mse", "gather_with_grad"]


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_with_grad(x: Tensor) -> Tensor:
    """x: [B, D] on every rank -> [world * B, D], rank-major; gradients flow back to every rank's rows.

    Plain ``dist.all_gather`` would cut the graph (its outputs are fresh leaves), so use the autograd
    collective. Every rank must pass the same B.
    """
    from torch.distributed import _functional_collectives as fc

    return fc.all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=torch.distributed.group.WORLD)


def info_nce(emb_a: Tensor, emb_v: Tensor, temperature: float, symmetric: bool = False,
             gather: bool = True) -> tuple[Tensor, Tensor]:
    """emb_a, emb_v: [B, D] paired rows (not yet normalised).

    Returns (loss, acc), both 0-dim fp32 tensors (acc without a host sync). Unidirectional: for each
    video row j, cross-entropy over the audio candidates (the official ``softmax(S, dim=0)`` column
    loss with ``S = a_hat v_hat^T / tau``); acc = fraction of videos whose best audio is their own.
    Symmetric: mean of the video->audio and audio->video losses and accuracies.
    """
    if emb_a.shape != emb_v.shape or emb_a.dim() != 2:
        raise ValueError(f"emb_a {tuple(emb_a.shape)} and emb_v {tuple(emb_v.shape)} must be equal [B, D]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    a = F.normalize(emb_a.float(), dim=-1)
    v = F.normalize(emb_v.float(), dim=-1)
    b = a.shape[0]
    distributed = gather and _dist_active() and torch.distributed.get_world_size() > 1
    # video->audio needs every rank's audio rows only; the videos are gathered for audio->video alone
    all_a = gather_with_grad(a) if distributed else a
    all_v = gather_with_grad(v) if distributed and symmetric else v
    offset = torch.distributed.get_rank() * b if distributed else 0
    target = torch.arange(b, device=a.device) + offset

    def direction(q: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 logits even under autocast: a bf16 cosine (8 bits of mantissa) divided by tau = 0.05
        # errs by up to ~0.02 in the logit (512 x 768 rows); the [B, world*B] matmul is negligible here
        dev = q.device.type
        fp32 = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)   # (meta: no autocast state)
        with torch.autocast(dev, enabled=False) if fp32 else contextlib.nullcontext():
            logits = q @ keys.t() / temperature        # [B, world*B]: each local query vs all keys
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(dim=1) == target).float().mean()
        return loss, acc

    loss_va, acc_va = direction(v, all_a)              # video -> audio (official default)
    if not symmetric:
        return loss_va, acc_va
    loss_av, acc_av = direction(a, all_v)
    return 0.5 * (loss_va + loss_av), 0.5 * (acc_va + acc_av)


def distill_mse(student_a: Tensor, student_v: Tensor, teacher_a: Tensor, teacher_v: Tensor,
                normalize: bool = True) -> Tensor:
    """Distillation of the student globals [B, D] to the teacher's [B, D] (targets are detached).

    sum_d (s - t)^2, mean over the batch, summed over audio and video; fp32.
    """
    total = None
    for s, t in ((student_a, teacher_a), (student_v, teacher_v)):
        if s.shape != t.shape:
            raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} globals differ in shape")
        s, t = s.float(), t.detach().float()
        if normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        term = (s - t).pow(2).sum(dim=-1).mean()
        total = term if total is None else total + term
    return total
