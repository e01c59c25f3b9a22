"""gpucheck step "train": a short ``paper()`` run exactly as ``tgdp.train`` sets it up, timed.

:class:`tgdp.training.trainer.Trainer` builds the run (fast model, fused Adam(W), ``torch.compile`` with
CUDA graphs, the DALI loader on the generated shards with host-packed reconstruction masks, the
prefetcher); this step then drives :func:`tgdp.training.loop.train_step` itself to time it:

- steps ``0 .. timed_from - 1`` compile, warm up and record the CUDA graphs;
- steps ``timed_from .. steps - 1`` are timed (``torch.cuda.synchronize`` at both ends):
  samples/s, MFU (counted FLOPs per sample from :func:`tgdp.perf.train_flops_per_sample` / the
  GPU's dense bf16 peak), peak memory, and the synchronising calls the CUDA runtime reports
  (``torch.cuda.set_sync_debug_mode``) inside ``train_step`` and inside the data fetch, per step;
- ``guard_steps`` more steps run under :class:`tgdp.syncguard.HostSyncGuard` (which runs them eager:
  Dynamo steps aside under a dispatch mode) and name every host-reading op of ``train_step``.

Passes when every step's loss is finite, FlashAttention ran (GPU), and ``train_step`` has no host
sync (guard, and on a GPU the CUDA runtime too). The measured step time is also set against the
per-op roofline projection of :mod:`tgdp.perf` for this batch.
"""

from __future__ import annotations

import contextlib
import os
import time

from tgdp.gpucheck.common import Context, result

__all__ = ["run"]


def _config(ctx: Context):
    from tgdp.configs import PRESETS, apply_overrides

    s = ctx.settings
    over = {**s.get("model_overrides", {}), "data.root": str(ctx.shards / "train"), "data.loader": "dali",
            "data.host_masks": True, "data.cache_frames": 0, "data.num_workers": max(1, min(8, os.cpu_count() or 1)),
            "train.batch_size": s["batch"], "train.steps": s["steps"] + s["guard_steps"],
            "train.out_dir": str(ctx.out / "train_run"), "train.log_every": 10_000,
            "train.ckpt_every": 10_000, "train.seed": 0, **s["overrides"]}
    return apply_overrides(PRESETS[s["preset"]](), over)


def run(ctx: Context) -> dict:
    import torch
    from tgdp.model.attention import flash_varlen_func
    from tgdp.syncguard import HostSyncGuard, cuda_sync_debug
    from tgdp.training.distributed import init_distributed
    from tgdp.training.logger import peak_flops
    from tgdp.training.loop import METRICS, train_step
    from tgdp.training.trainer import Trainer

    s = ctx.settings
    cfg = _config(ctx)
    problems = []
    if not ctx.smoke and flash_varlen_func() is None:
        problems.append("flash-attn is not importable (pip install -e '.[gpu]'); ran with SDPA")
        from tgdp.configs import apply_overrides
        cfg = apply_overrides(cfg, {"model.attn_backend": "sdpa"})
    ctx.progress("build")
    info = init_distributed(cfg)
    trainer = Trainer(cfg, info, progress=False)
    state, source, dev = trainer.state, trainer.source, info.device
    backend = trainer.method.student.attention_backend(dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    sync_train, sync_data, step_wall = [], [], []
    t_timed = None
    for step in range(s["steps"]):
        ctx.progress(f"step {step}" + (" (compile, warm-up)" if step < s["timed_from"] else ""),
                     step_wall_s=step_wall[-3:])
        timed = step >= s["timed_from"]
        if timed and t_timed is None:
            if cuda:
                torch.cuda.synchronize(dev)
            t_timed = time.perf_counter()
        t0 = time.perf_counter()
        debug = cuda_sync_debug if (cuda and timed) else (lambda: contextlib.nullcontext([]))
        with debug() as found_data:
            batch = source.next()
        with debug() as found_train:
            train_step(state, batch, step)
        sync_data += list(found_data)
        sync_train += list(found_train)
        step_wall.append(round(time.perf_counter() - t0, 4))
    if cuda:
        torch.cuda.synchronize(dev)
    timed_steps = s["steps"] - s["timed_from"]
    wall = time.perf_counter() - t_timed
    sps = timed_steps * s["batch"] / wall
    peak_mem = torch.cuda.max_memory_allocated(dev) if cuda else None

    ctx.progress("guard steps")
    guard_syncs = []
    for step in range(s["steps"], s["steps"] + s["guard_steps"]):
        batch = source.next()
        with HostSyncGuard(raise_on_sync=False) as g:
            train_step(state, batch, step)
        guard_syncs += g.syncs
    sums = state.sums.tolist()          # host sync: once, after the run
    n_ok, n_bad = int(sums[len(METRICS)]), int(sums[len(METRICS) + 1])
    mean_loss = sums[0] / n_ok if n_ok else float("nan")

    ctx.progress("count FLOPs")
    from tgdp.perf import report as roofline_report
    from tgdp.perf import train_flops_per_sample

    flops = train_flops_per_sample(cfg, batch=s["batch"])["total"]
    peak = peak_flops(dev)
    mfu = flops * sps / peak if peak else None
    proj = roofline_report(cfg, batches=(s["batch"],), gpus=(1,))["batches"][str(s["batch"])]["step_s"]
    step_s = wall / timed_steps
    steps_total = s["steps"] + s["guard_steps"]
    per_step = {"train_step_guard": len(guard_syncs) / s["guard_steps"],
                "train_step_cuda": len(sync_train) / timed_steps if cuda else None,
                "data_cuda": len(sync_data) / timed_steps if cuda else None}
    if n_bad or n_ok != steps_total:
        problems.append(f"{n_bad} non-finite steps of {steps_total}")
    if guard_syncs:
        problems.append(f"host syncs in train_step: {sorted(set(guard_syncs))[:3]}")
    if sync_train:
        problems.append(f"{len(sync_train)} synchronising CUDA calls in train_step over {timed_steps} steps")
    if not ctx.smoke and backend != "flash":
        problems.append(f"attention backend '{backend}', not FlashAttention")
    mem = f"{peak_mem / 2**30:.1f} GiB" if peak_mem is not None else "n/a (CPU)"
    mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a (no GPU peak)"
    summary = (f"{s['preset']} batch {s['batch']}, {timed_steps} timed steps: {sps:.1f} samples/s, MFU {mfu_s}, "
               f"peak memory {mem}, host syncs/step {per_step['train_step_guard']:g} (guard)"
               + (f", {per_step['train_step_cuda']:g} train / {per_step['data_cuda']:g} data (CUDA runtime)"
                  if cuda else "") + f"; step {step_s * 1e3:.0f} ms"
               + (f" vs projected {proj['fused'] * 1e3:.0f}-{proj['eager'] * 1e3:.0f} ms" if cuda else ""))
    if problems:
        summary = "; ".join(problems) + " | " + summary
    return result(not problems, summary, samples_per_s=sps, mfu=mfu, peak_memory_bytes=peak_mem,
                  step_s=step_s, projected_step_s=proj, flops_per_sample=flops, peak_flops=peak,
                  host_syncs_per_step=per_step, guard_syncs=guard_syncs, cuda_syncs_train=sync_train[:20],
                  cuda_syncs_data=sync_data[:20], step_wall_s=step_wall, mean_loss=mean_loss,
                  attention_backend=backend, notes=trainer.notes, config=cfg.preset,
                  compile=cfg.train.compile, cuda_graphs=cfg.train.cuda_graphs, loader=cfg.data.loader,
                  host_masks=cfg.data.host_masks)
