"""The run around :func:`tgdp.training.loop.train_step`: the folder, resume, logging, checkpoints.

``Trainer(cfg, info, root).run()`` trains to ``total`` steps and returns the summary dict. Host
syncs happen only at log steps (one ``tolist`` of the accumulated metrics, skip counts and the
parameter check) and checkpoint steps (state gather).

Non-finite parameters. ``train_step`` already skips, on device, a step whose loss or gradient norm
is not finite. An update can still overflow with finite inputs (a huge ``train.lr``, extreme data):
the parameters then hold NaN/Inf and every later step is skipped. This is detected at every log
step and before every save with one foreach max-abs pass over the parameters (no per-step cost, no
extra sync: the flag rides in the log step's all-reduce). The run then stops with
:class:`TrainingDiverged` naming the step range; nothing non-finite is ever saved, so the last
checkpoint is intact. Rolling back instead was rejected: the data order, masks and noise are
functions of (seed, step), so a replay from the last good state diverges again at the same step,
and keeping a per-step copy of the parameters and moments would cost three times the parameter
memory.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from tgdp.atomic import check_writable
from tgdp.cli import UserError
from tgdp.configs import Config, to_dict
from tgdp.data.loader import SKIP_REASONS
from tgdp.training import checkpoint as ck
from tgdp.training import rundir
from tgdp.training.distributed import (DistInfo, all_reduce_, barrier, local_tensors, shard_teacher,
                                       wrap_student)
from tgdp.training.logger import RunLogger, peak_flops
from tgdp.training.loop import METRICS, StepState, build_method, build_optimizer, total_steps, train_step
from tgdp.training.schedule import WarmupCosine, lr_at
from tgdp.training.prefetch import Prefetcher
from tgdp.training.sources import make_source

__all__ = ["Trainer", "TrainingDiverged", "params_nonfinite", "check_data_size"]


class TrainingDiverged(UserError):
    """The parameters became non-finite; the message names the step range and the last good checkpoint."""


def params_nonfinite(module: nn.Module) -> torch.Tensor:
    """0-dim float tensor on the parameters' device: 1.0 if any (local shard of a) parameter is NaN/Inf.

    One foreach max-abs pass over the parameters, no host sync (the caller reads it at a log step).
    """
    params = list(module.parameters())
    ts = [t for t in local_tensors([p.detach() for p in params]) if t.numel()]   # FSDP2 shards may be empty
    if not ts:
        return torch.zeros((), device=params[0].device if params else None)
    return (~torch.isfinite(torch.nn.utils.get_total_norm(ts, norm_type=float("inf"), foreach=True))).float()


def check_data_size(cfg: Config, root: str | None) -> None:
    """From the shard manifest, before any decoding: the data holds at least one global batch, and it
    was prepared with the audio channel rule ``data.channels`` asks for."""
    if root is None:
        return
    from tgdp.data.shards import manifest_channels, read_manifest

    man = read_manifest(root)
    n, b = int(man["num_samples"]), cfg.train.batch_size
    if n == 0:
        raise UserError(f"the training data {root} holds no clips (manifest.json lists 0); re-run "
                        "python -m tgdp.prepare or pass another --data.root")
    if n < b:
        raise UserError(f"train.batch_size={b} is larger than the {n} clips of {root} (manifest.json); "
                        f"lower --train.batch_size to at most {n} or add data")
    ch = manifest_channels(man)
    if ch != cfg.data.channels:
        raise UserError(f"data.channels={cfg.data.channels!r} but {root} was prepared with channels={ch!r}; "
                        f"pass --data.channels {ch} or re-run python -m tgdp.prepare --channels "
                        f"{cfg.data.channels} into another --out")


class Trainer:
    """Everything a run holds. ``Trainer(cfg, info, root).run()`` trains to ``total`` steps and returns
    the summary dict; ``train.resume`` continues from the newest intact checkpoint of the run in
    ``<out_dir>/checkpoints`` exactly.

    Before any model is built or data decoded, the constructor checks that the data holds a batch,
    that ``out_dir`` and ``checkpoints/`` are writable, and who owns the folder
    (:func:`tgdp.training.rundir.claim`: fresh run, resume, or a one-line refusal).
    """

    def __init__(self, cfg: Config, info: DistInfo, root: str | None = None, progress: bool = True):
        self.cfg, self.info, self.root = cfg, info, root
        self.progress_bar = progress
        t = cfg.train
        self.out = Path(t.out_dir)
        self.total = total_steps(cfg, root)
        check_data_size(cfg, root)
        self.notes: list[str] = []
        self.ckpt = ck.CheckpointManager(self.out / "checkpoints", t.keep_last, clean=info.is_main)
        self.run_id, resume_from = self._claim()
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
        self.source = Prefetcher(make_source(cfg, info.rank, info.world_size, root=root), dev)
        self.step = 0
        self.resumed = False
        self.skips_before: Counter = Counter()   # skipped samples of the run before this process
        self.skips: dict[str, int] = {}           # whole run, all ranks, as of the last log step
        self.flops_per_sample = None
        self.last_saved: Path | None = None
        if resume_from is not None:
            self._resume(*resume_from)
        self.ckpt.run_id = self.run_id

    # ------------------------------------------------------------------ the run folder

    def _claim(self) -> tuple[str, tuple[Path, dict] | None]:
        """Rank 0 decides (writability, ownership, which checkpoint to resume) and tells the others."""
        t, info = self.cfg.train, self.info
        msg: tuple = ()
        found = None
        if info.is_main:
            try:
                check_writable(self.out)
                check_writable(self.out / "checkpoints")
                run_id, resume, notes = rundir.claim(self.out, self.ckpt, resume=t.resume, overwrite=t.overwrite)
                self.notes += notes
                if resume:   # reads and verifies files only: no model is built yet
                    found = self.ckpt.resume()
                    self.notes += self.ckpt.notes
                    self.ckpt.notes = []
                msg = ("ok", run_id, str(found[0]) if found else None)
            except (UserError, OSError) as exc:
                msg = ("error", exc)
                if not info.enabled:
                    raise
        if info.enabled:
            box = [msg]
            torch.distributed.broadcast_object_list(box, src=0)
            msg = box[0]
        if msg[0] == "error":
            exc = msg[1]
            raise exc if info.is_main else UserError(str(exc) if not isinstance(exc, OSError) else
                                                     f"rank 0 could not use {exc.filename}: {exc.strerror}")
        _, run_id, path = msg
        if path is not None and found is None:
            found = (Path(path), ck.CheckpointManager.load(path))
        return run_id, found

    def _resume(self, path: Path, st: dict) -> None:
        diff = rundir.config_diff(st["config"], to_dict(self.cfg))
        if diff:
            self.notes.append(f"resuming with a config that differs from {path.name}'s: " + "; ".join(diff))
        self._check_shapes(path, st["model"], [d for d in diff if d.startswith("model.")])
        ck.load_model_state(self.method.student, st["model"], self.fsdp)
        ck.load_model_state(self.method.teacher.module, st["teacher"], self.fsdp)
        ck.load_optimizer_state(self.method.student, self.optimizer, st["optimizer"], self.fsdp)
        self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.source.source.load_state_dict(st["data"])
        self.state.skipped_total.fill_(float(st.get("skipped_steps", 0)))
        if st["data"].get("kind") != "cached":
            # streamed sources count a corrupt sample each epoch they meet it; the cache (data.cache_frames)
            # decodes the split once per process, so this process has just counted its skips again
            self.skips_before = Counter(st.get("skipped_samples", {}))
        self.skips = dict(self.skips_before)
        rngs = st["rng"]
        ck.set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.run_id = st.get("run_id") or self.ckpt.run_id or rundir.new_run_id()
        if not st.get("run_id"):
            self.notes.append(f"{path.name} has no run id (older tgdp); continuing it as run {self.run_id}")
        self.resumed = True
        self.last_saved = path
        self.notes.append(f"resumed from {path.name} at step {self.step} (run {self.run_id})")

    def _check_shapes(self, path: Path, saved: dict, model_diff: list[str]) -> None:
        own = {k: tuple(v.shape) for k, v in self.method.student.state_dict().items()}
        bad = [f"{k} {tuple(saved[k].shape)} vs {own[k]}" for k in own if k in saved and tuple(saved[k].shape) != own[k]]
        keys = sorted(set(own) ^ set(saved))
        if bad or keys:
            what = "; ".join(model_diff) or (bad[:1] + keys[:1])[0]
            raise UserError(f"cannot resume from {path}: the model shape differs from the checkpoint's ({what}); "
                            "resume with the checkpoint's model settings, or start a new run in another "
                            "--train.out_dir")

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

    def _local_skips(self) -> Counter:
        """Samples this rank's source skipped in this process (a resume's replay excluded), by reason."""
        return Counter(getattr(self.source.source, "skipped", None) or {})

    def _diverged(self, first: int, last: int) -> TrainingDiverged:
        if self.last_saved:
            todo = (f"the last checkpoint, {self.last_saved}, is intact: resume from it with a lower --train.lr "
                    "(--train.resume true) or check the data")
        else:
            todo = "no checkpoint was written: start again with a lower --train.lr or check the data"
        return TrainingDiverged(
            f"the model parameters became NaN/Inf between step {first} and step {last} (an update "
            f"overflowed: train.lr={self.cfg.train.lr:g} too large, or the data holds extreme values); "
            f"nothing non-finite was saved; {todo}")

    def save(self) -> None:
        """Checkpoint at ``self.step`` (every rank joins the gathers; rank 0 writes).

        Refuses (:class:`TrainingDiverged`) to save parameters that are not finite."""
        bad = all_reduce_(params_nonfinite(self.method.student).reshape(1), "max")
        if bad.item() > 0:  # sync: checkpoint step only
            raise self._diverged(self._last_log_step + 1, self.step)
        student, teacher = self.method.student, self.method.teacher.module
        state = {"model": ck.model_state(student, self.fsdp), "teacher": ck.model_state(teacher, self.fsdp),
                 "optimizer": ck.optimizer_state(student, self.optimizer, self.fsdp),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "data": self.source.state_dict(), "config": to_dict(self.cfg),
                 "skipped_steps": int(self.state.skipped_total.item()),  # sync: checkpoint step only
                 "world_size": self.info.world_size, "run_id": self.run_id}
        mine = (ck.rng_state(), dict(self._local_skips()))
        if self.info.enabled:
            gathered: list = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        state["rng"] = [g[0] for g in gathered]
        skips = Counter(self.skips_before)
        for g in gathered:
            skips.update(g[1])
        state["skipped_samples"] = dict(skips)
        if self.info.is_main:
            self.last_saved = self.ckpt.save(state, self.step)
            for note in self.ckpt.notes:
                print(f"[tgdp.train] {note}", flush=True)
            self.ckpt.notes = []
        barrier()

    # ------------------------------------------------------------------ loop

    def _log_values(self, t_prev: float, steps: int) -> dict[str, float]:
        s = self.state
        local = self._local_skips()
        vec = [float(local.get(r, 0)) for r in SKIP_REASONS] + [float(sum(v for r, v in local.items()
                                                                          if r not in SKIP_REASONS))]
        buf = torch.cat([s.sums, torch.tensor(vec, dtype=s.sums.dtype).to(s.sums.device),
                         params_nonfinite(self.method.student).reshape(1).to(s.sums.dtype)])
        vals = all_reduce_(buf).tolist()  # host sync: the one per log step
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
        base = len(METRICS) + 2
        skips = Counter(self.skips_before)
        skips.update({r: int(v) for r, v in zip((*SKIP_REASONS, "other"), vals[base:-1]) if v})
        self.skips = dict(sorted(skips.items()))
        out.update(skipped=self.skips, skipped_total=sum(self.skips.values()), nonfinite_params=int(vals[-1] > 0))
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
        log = RunLogger(self.out, self.total, self.step, enabled=info.is_main, progress=self.progress_bar,
                        run_id=self.run_id, resume=self.resumed)
        for note in self.notes:
            if info.is_main:
                print(f"[tgdp.train] {note}", flush=True)
        self.method.train()
        t0 = t_prev = time.perf_counter()
        start = last_log = self._last_log_step = self.step
        try:
            while self.step < self.total:
                batch = self.source.next()
                train_step(self.state, batch, self.step)
                self.step += 1
                log.advance()
                if self.step % t.log_every == 0 or self.step == self.total:
                    row = self._log_values(t_prev, self.step - last_log)
                    log.log(self.step, row)
                    if row["nonfinite_params"]:
                        raise self._diverged(last_log + 1, self.step)
                    t_prev, last_log = time.perf_counter(), self.step
                    self._last_log_step = last_log
                if self.step % t.ckpt_every == 0 or self.step == self.total:
                    self.save()
            wall = time.perf_counter() - t0
            summary = {"run_id": self.run_id, "steps": self.step, "total_steps": self.total, "resumed_from": start,
                       "wall_s": wall, "samples_per_s": (self.step - start) * t.batch_size / max(wall, 1e-9),
                       "nonfinite_steps": int(self.state.skipped_total.item()),  # sync: end of run
                       "skipped": self.skips, "skipped_total": sum(self.skips.values()),
                       "world_size": info.world_size, "dist": t.dist if info.enabled else "none",
                       "device": str(info.device), "flops_per_sample": self.flops_per_sample,
                       "last": log.rows[-1] if log.rows else None, "notes": self.notes,
                       "checkpoint": str(self.ckpt.latest()) if info.is_main else None,
                       "config": to_dict(cfg)}
            log.summary(summary)
        finally:
            log.close()
            close = getattr(self.source, "close", None)
            if close is not None:   # the prefetch thread must not outlive the run (nor hold the source)
                close()
        return summary
