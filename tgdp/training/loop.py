"""The training step: build the method and optimizer, draw masks, ``train_step``. The run around it
(folder, resume, logging, checkpoints) is :class:`tgdp.training.trainer.Trainer`.

Host syncs happen only at log steps and checkpoint steps (see the trainer); ``train_step`` itself
enqueues device work only: the finite check, the skip of a non-finite step (the fused
optimizer's ``found_inf``, Adam or AdamW) and the EMA weight are device tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tgdp.configs import Config
from tgdp.masking import Masks, random_masks
from tgdp.teacher import momentum_at
from tgdp.training.distributed import DistInfo, all_reduce_, ema_update_
from tgdp.training.schedule import WarmupCosine
from tgdp.training.sources import TrainBatch

__all__ = ["METRICS", "build_method", "build_optimizer", "step_seed", "draw_rec_masks", "StepState",
           "train_step", "total_steps"]

METRICS = ("loss", "loss_rec", "loss_rec_a", "loss_rec_v", "loss_dis", "loss_con", "acc")


def build_method(cfg: Config, device: torch.device) -> nn.Module:
    """``tgdp.method.TGDP`` on the fast model (``train.model_impl`` "fast" or "auto") or the reference
    (measured on the tiny preset, CPU, batch 32: fast 0.31-0.34 s/step vs reference 0.38-0.40 s/step)."""
    from tgdp.method import TGDP
    from tgdp.model import build_encoder

    model = build_encoder(cfg.model, cfg.train.model_impl, device)
    # The input value check syncs with the device every step; the loop checks the loss instead.
    return TGDP(cfg, model=model, device=device, check_finite=False).to(device)


def build_optimizer(student: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable student parameters (pos-embed tables are buffers):
    "adam" = torch Adam, whose weight decay is added to the gradient (coupled L2, as the official
    CAV-MAE / Sync scripts: Adam, weight_decay 5e-7); "adamw" = decoupled decay.

    fused=True on every device: besides speed on CUDA, the fused kernels (Adam and AdamW, CPU since
    torch 2.4) honour ``found_inf``, so ``train_step`` skips a non-finite step on device; the
    for-each and single-tensor paths would reject ``found_inf``."""
    t = cfg.train
    params = [p for p in student.parameters() if p.requires_grad]
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if t.optimizer not in kinds:
        raise ValueError(f"train.optimizer={t.optimizer!r} must be one of {sorted(kinds)}")
    return kinds[t.optimizer](params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=True)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """Seed of the explicit generator of (run seed, step, stream); stream 0 = global masks, 1 + rank = local."""
    return (seed * 1_000_003 + step * 8191 + stream * 131) % (2**63 - 1)


def _slice(m: Masks, sl: slice) -> Masks:
    return Masks(m.ids_keep[sl], m.ids_restore[sl], m.mask[sl])


def draw_rec_masks(cfg: Config, step: int, info: DistInfo) -> tuple[Masks, Masks]:
    """Random reconstruction masks for the *global* batch from a (seed, step) generator, sliced to
    this rank's rows, so a distributed step masks exactly like the single-process step."""
    m, b = cfg.model, cfg.train.batch_size
    dev = info.device
    gen = torch.Generator(device=dev).manual_seed(step_seed(cfg.train.seed, step))
    ma = random_masks(b, m.num_patches_a, cfg.masking.rec_ratio, gen, dev)
    mv = random_masks(b, m.num_patches_v, cfg.masking.rec_ratio, gen, dev)
    local = b // info.world_size
    sl = slice(info.rank * local, (info.rank + 1) * local)
    return _slice(ma, sl), _slice(mv, sl)


@dataclass
class StepState:
    """What one step touches. ``sums``: [len(METRICS) + 2] device accumulators (metric sums over
    finite steps, finite-step count, non-finite-step count) since the last log step."""

    cfg: Config
    info: DistInfo
    forward: nn.Module           # the module to call (DDP wrapper, compiled, or the method itself)
    method: nn.Module            # plain TGDP (student + teacher)
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    total_steps: int
    autocast_dtype: torch.dtype | None
    sums: torch.Tensor = field(default=None)
    skipped_total: torch.Tensor = field(default=None)


def train_step(s: StepState, batch: TrainBatch, step: int) -> None:
    """One optimizer step on this rank's rows: dual path + teacher forward, backward, (clip), Adam/AdamW,
    EMA teacher. No host sync: a non-finite loss/grad norm skips the update on device."""
    cfg, dev = s.cfg, s.info.device
    # data.host_masks: the source packed them on the host; else drawn on the device here
    masks_rec = batch.masks_rec if batch.masks_rec is not None else draw_rec_masks(cfg, step, s.info)
    # The contrastive masks' draws (none for guide=distinct) are made here, outside a compiled
    # forward: a torch.Generator inside it would be a graph break
    gen = None
    if s.method.noise_fields(rec=False):
        gen = torch.Generator(device=dev).manual_seed(step_seed(cfg.train.seed, step, 1 + s.info.rank))
    noise = s.method.draw_noise(batch.audio.shape[0], dev, gen, rec=False)
    # Packed layouts built once on the device (dict lookups after the first step), so a compiled
    # forward reads their cu_seqlens as inputs instead of building them in the graph
    s.method.prepare_layouts(batch.audio.shape[0], dev)
    with torch.autocast(dev.type, dtype=s.autocast_dtype or torch.float32, enabled=s.autocast_dtype is not None):
        out = s.forward(batch.audio, batch.frames, masks_rec=masks_rec, noise=noise)
    out.loss.backward()
    bad = ~torch.isfinite(out.loss.detach())
    if cfg.train.grad_clip > 0:
        # foreach norm + scale on device; returns the pre-clip norm as a tensor (no sync)
        gnorm = torch.nn.utils.clip_grad_norm_(s.method.student.parameters(), cfg.train.grad_clip, foreach=True)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        bad = bad | ~torch.isfinite(gnorm)
    bad_f = all_reduce_(bad.float().reshape(1), "max").reshape(())  # every rank skips together
    s.optimizer.found_inf = bad_f   # fused Adam/AdamW skip params/moments/step count when found_inf == 1
    s.optimizer.grad_scale = None
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()
    m = momentum_at(cfg.teacher, step + 1, s.total_steps)
    ema_update_(s.method.teacher.module, s.method.student, (1.0 - m) * (1.0 - bad_f))
    vals = torch.stack([getattr(out, k).detach().float() for k in METRICS])
    vals = torch.where(bad_f > 0, torch.zeros_like(vals), vals)
    s.sums += torch.cat([vals, (1.0 - bad_f).reshape(1), bad_f.reshape(1)])
    s.skipped_total += bad_f


def total_steps(cfg: Config, root: str | None) -> int:
    """``train.steps``, else ``epochs × samples / batch`` from the shard manifest."""
    if cfg.train.steps > 0:
        return cfg.train.steps
    if cfg.data.root == "random":
        raise ValueError("train.steps=0 with data.root='random': the noise source has no epoch; set train.steps")
    from tgdp.data.loader import read_manifest

    n = read_manifest(root or cfg.data.root)["num_samples"]
    return max(1, int(cfg.train.epochs * n // cfg.train.batch_size))
