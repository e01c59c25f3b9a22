"""The training loop: build (model, optimizer, schedule, data), ``train_step``, log/checkpoint, resume.

Host syncs happen only at log steps (one ``tolist`` of the accumulated metrics) and checkpoint
steps (state gather); ``train_step`` itself enqueues device work only: the finite check, the
skip of a non-finite step (fused AdamW's ``found_inf``) and the EMA weight are device tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tgdp.configs import Config, to_dict
from tgdp.masking import Masks, random_masks
from tgdp.teacher import momentum_at
from tgdp.training import checkpoint as ck
from tgdp.training.distributed import (DistInfo, all_reduce_, barrier, ema_update_, shard_teacher,
                                       wrap_student)
from tgdp.training.logger import RunLogger, peak_flops
from tgdp.training.schedule import WarmupCosine, lr_at
from tgdp.training.prefetch import Prefetcher
from tgdp.training.sources import TrainBatch, make_source

__all__ = ["METRICS", "build_method", "build_optimizer", "step_seed", "draw_rec_masks", "StepState",
           "train_step", "Trainer"]

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
    """AdamW over the trainable student parameters (pos-embed tables are buffers, not params).

    fused=True on every device: besides speed on CUDA, the fused kernel honours ``found_inf`` so a
    non-finite step is skipped on device (CPU fused AdamW exists since torch 2.4)."""
    t = cfg.train
    params = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=True)


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
    """One optimizer step on this rank's rows: dual path + teacher forward, backward, (clip), AdamW,
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
    s.optimizer.found_inf = bad_f   # fused AdamW skips params/moments/step count when found_inf == 1
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


class Trainer:
    """Everything a run holds. ``Trainer(cfg, info, root).run()`` trains to ``total`` steps and returns
    the summary dict; ``train.resume`` continues from ``<out_dir>/checkpoints/latest`` exactly."""

    def __init__(self, cfg: Config, info: DistInfo, root: str | None = None, progress: bool = True):
        self.cfg, self.info, self.root = cfg, info, root
        self.progress_bar = progress
        t = cfg.train
        self.out = Path(t.out_dir)
        self.total = total_steps(cfg, root)
        self.notes: list[str] = []
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        dev = info.device
        self.method = build_method(cfg, dev)
        if t.init:   # official or tgdp weights for student and teacher (a resume then overrides them)
            from tgdp.convert import load_official
            load_official(self.method.student, t.init)
            self.method.teacher.module.load_state_dict(self.method.student.state_dict())
            self.notes.append(f"initialised from {t.init}")
        self.fsdp = info.enabled and t.dist == "fsdp2"
        forward = wrap_student(self.method, self.method.student, cfg, info)
        shard_teacher(self.method.teacher.module, cfg, info)
        self.optimizer = build_optimizer(self.method.student, cfg)
        self.scheduler = WarmupCosine(self.optimizer, self.total, t.lr, t.warmup_frac, t.min_lr_ratio)
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and dev.type == "cuda")
        forward = self._maybe_compile(forward)
        self.state = StepState(cfg, info, forward, self.method, self.optimizer, self.scheduler, self.total,
                               torch.bfloat16 if use_bf16 else None,
                               torch.zeros(len(METRICS) + 2, device=dev), torch.zeros((), device=dev))
        self.ckpt = ck.CheckpointManager(self.out / "checkpoints", t.keep_last, clean=info.is_main)
        self.source = Prefetcher(make_source(cfg, info.rank, info.world_size, root=root), dev)
        self.step = 0
        self.flops_per_sample = None
        if t.resume:
            self._resume()

    # ------------------------------------------------------------------ capabilities

    def _maybe_compile(self, forward: nn.Module) -> nn.Module:
        t, cuda = self.cfg.train, self.info.device.type == "cuda"
        if t.cuda_graphs and not cuda:
            self.notes.append("train.cuda_graphs skipped: no CUDA device")
        if not t.compile:
            if t.cuda_graphs and cuda:
                self.notes.append("train.cuda_graphs needs train.compile; skipped")
            return forward
        # reduce-overhead = CUDA-graph trees over the compiled forward and backward (static shapes:
        # the visible counts are fixed per mask ratio, the batch is fixed by drop_last)
        mode = "reduce-overhead" if (t.cuda_graphs and cuda) else "default"
        self.notes.append(f"torch.compile mode={mode}")
        return torch.compile(forward, mode=mode)

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        path = self.ckpt.latest()
        if path is None:
            self.notes.append("train.resume: no checkpoint found, starting from scratch")
            return
        st = ck.CheckpointManager.load(path)
        ck.load_model_state(self.method.student, st["model"], self.fsdp)
        ck.load_model_state(self.method.teacher.module, st["teacher"], self.fsdp)
        ck.load_optimizer_state(self.method.student, self.optimizer, st["optimizer"], self.fsdp)
        self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.source.source.load_state_dict(st["data"])
        self.state.skipped_total.fill_(float(st.get("skipped_steps", 0)))
        rngs = st["rng"]
        ck.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.notes.append(f"resumed from {path.name} at step {self.step}")

    def save(self) -> None:
        """Checkpoint at ``self.step`` (every rank joins the gathers; rank 0 writes)."""
        student, teacher = self.method.student, self.method.teacher.module
        state = {"model": ck.model_state(student, self.fsdp), "teacher": ck.model_state(teacher, self.fsdp),
                 "optimizer": ck.optimizer_state(student, self.optimizer, self.fsdp),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "data": self.source.state_dict(), "config": to_dict(self.cfg),
                 "skipped_steps": int(self.state.skipped_total.item()),  # sync: checkpoint step only
                 "world_size": self.info.world_size}
        rng = ck.rng_state()
        if self.info.enabled:
            rngs: list = [None] * self.info.world_size
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        state["rng"] = rngs
        if self.info.is_main:
            self.ckpt.save(state, self.step)
        barrier()

    # ------------------------------------------------------------------ loop

    def _log_values(self, t_prev: float, steps: int) -> dict[str, float]:
        s = self.state
        buf = all_reduce_(s.sums.clone())
        vals = buf.tolist()  # host sync: the one per log step
        s.sums.zero_()
        n_ok = vals[len(METRICS)]
        out = {k: (v / n_ok if n_ok > 0 else float("nan")) for k, v in zip(METRICS, vals)}
        dt = max(time.perf_counter() - t_prev, 1e-9)
        sps = steps * self.cfg.train.batch_size / dt
        lr = lr_at(self.step - 1, self.total, self.cfg.train.lr, self.cfg.train.warmup_frac,
                   self.cfg.train.min_lr_ratio)   # the rate of the last step taken
        out.update(lr=lr, samples_per_s=sps,
                   nonfinite_steps=int(vals[len(METRICS) + 1]) // self.info.world_size)  # every rank counts it
        if self.flops_per_sample:
            out["tflops_per_s"] = self.flops_per_sample * sps / 1e12
            peak = peak_flops(self.info.device)
            if peak:
                out["mfu"] = self.flops_per_sample * sps / (peak * self.info.world_size)
        return out

    def _count_flops(self) -> None:
        try:
            from tgdp.perf import train_flops_per_sample
            from tgdp.reference.model import CAVMAESync
            impl = "reference" if type(self.method.student) is CAVMAESync else "fast"
            self.flops_per_sample = train_flops_per_sample(self.cfg, device="meta", impl=impl)["total"]
        except (ImportError, RuntimeError, NotImplementedError, ValueError) as exc:
            self.notes.append(f"FLOP count unavailable: {type(exc).__name__}: {exc}")

    def run(self) -> dict:
        cfg, info, t = self.cfg, self.info, self.cfg.train
        self._count_flops()
        log = RunLogger(self.out, self.total, self.step, enabled=info.is_main, progress=self.progress_bar)
        for note in self.notes:
            if info.is_main:
                print(f"[tgdp.train] {note}", flush=True)
        self.method.train()
        t0 = t_prev = time.perf_counter()
        start, last_log = self.step, self.step
        while self.step < self.total:
            batch = self.source.next()
            train_step(self.state, batch, self.step)
            self.step += 1
            log.advance()
            if self.step % t.log_every == 0 or self.step == self.total:
                log.log(self.step, self._log_values(t_prev, self.step - last_log))
                t_prev, last_log = time.perf_counter(), self.step
            if self.step % t.ckpt_every == 0 or self.step == self.total:
                self.save()
        wall = time.perf_counter() - t0
        summary = {"steps": self.step, "total_steps": self.total, "resumed_from": start,
                   "wall_s": wall, "samples_per_s": (self.step - start) * t.batch_size / max(wall, 1e-9),
                   "nonfinite_steps": int(self.state.skipped_total.item()),  # sync: end of run
                   "world_size": info.world_size, "dist": t.dist if info.enabled else "none",
                   "device": str(info.device), "flops_per_sample": self.flops_per_sample,
                   "last": log.rows[-1] if log.rows else None, "notes": self.notes,
                   "checkpoint": str(self.ckpt.latest()) if info.is_main else None,
                   "config": to_dict(cfg)}
        log.summary(summary)
        log.close()
        return summary
