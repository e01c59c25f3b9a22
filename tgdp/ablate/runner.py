"""Run one (variant, seed) of a study: train with the ordinary loop, evaluate on the held-out split.

Layout under the study folder ``OUT``::

    OUT/runs/<variant>/seed-<s>/        the run's train.out_dir (checkpoints, metrics.jsonl, summary.json)
        config.toml                     the run's full config (``python -m tgdp.train --config`` reruns it)
        ablate_run.json                 fingerprint of config + evaluation, written before training
        result.json                     retrieval (+ probe) metrics; its presence = the run is finished

Resuming: a run with ``result.json`` is not rerun; any other run trains with ``train.resume true``,
so a killed run continues from its last checkpoint (and a run killed during evaluation only
re-evaluates). A folder whose fingerprint differs from the requested run (other steps, overrides,
data) is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from tgdp.ablate.variants import Variant, resolve
from tgdp.atomic import atomic_write_json, atomic_write_text
from tgdp.cli import UserError
from tgdp.configs import Config, apply_overrides, to_dict

__all__ = ["Study", "RunSpec", "run_config", "run_dir", "to_toml", "fingerprint", "prepare", "acquire", "execute",
           "run_one", "evaluate", "flops_per_step", "torchrun_command", "worker_command"]


@dataclass(frozen=True)
class Study:
    """What every run of a study shares. ``base`` = preset + config file + global overrides."""

    out: Path
    data: str                 # training shard folder
    val_data: str             # held-out shard folder (retrieval + probe evaluation)
    base: Config
    steps: int
    seeds: tuple[int, ...]
    torchrun: int = 1         # processes per run (1 = in this process)
    probe: bool = True        # run the probe when the data has labels


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    seed: int


def run_dir(study: Study, spec: RunSpec) -> Path:
    return study.out / "runs" / spec.variant.name / f"seed-{spec.seed}"


def run_config(study: Study, spec: RunSpec) -> Config:
    """The base config + the variant's overrides + what the study fixes for this run."""
    cfg = resolve(study.base, spec.variant)
    return apply_overrides(cfg, {"train.seed": spec.seed, "train.steps": study.steps,
                                 "train.out_dir": str(run_dir(study, spec)), "train.resume": True,
                                 "data.root": study.data}).validate()


def to_toml(cfg: Config) -> str:
    """The full config as commented TOML (``--print-config``'s format) that loads back to ``cfg``."""
    from tgdp.config_docs import DOCS, SECTIONS
    from tgdp.config_io import to_toml as _to_toml

    return _to_toml(cfg, {**SECTIONS, **DOCS})


def _eval_settings(study: Study) -> dict:
    return {"val_data": str(Path(study.val_data).expanduser().resolve()), "probe": study.probe}


def fingerprint(cfg: Config, study: Study) -> dict:
    """What makes a run's result: its full config and the evaluation settings (+ their sha256)."""
    rec = {"config": to_dict(cfg), "eval": _eval_settings(study)}
    rec["sha256"] = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()
    return rec


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} there, {y!r} now")
    return out


def _check_same(path: Path, want: dict) -> None:
    """UserError if the run folder was made for another config / evaluation."""
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); move the run folder aside to rerun it") from None
    have_fp = have.get("fingerprint", have)
    if have_fp.get("sha256") == want["sha256"]:
        return
    diff = _differences({"config": have_fp.get("config", {}), "eval": have_fp.get("eval", {})},
                        {"config": want["config"], "eval": want["eval"]})
    raise UserError(f"run folder {path.parent} was made with other settings ({'; '.join(diff[:4]) or 'unknown'}"
                    f"{'; …' if len(diff) > 4 else ''}); use another --out, or move that folder aside")


def torchrun_command(config_file: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tgdp.train", "--config", str(config_file)]


def _train(cfg: Config, rdir: Path, nproc: int) -> None:
    """Train in this process (its text output goes to ``RUN/train.log``; the step bar stays on a
    terminal) or, with ``nproc > 1``, as a torchrun job."""
    if nproc <= 1:
        from tgdp.train import train
        from tgdp.training.header import Origin

        origin = Origin(cfg.preset, str(rdir / "config.toml"))   # the run's full config, written by execute
        with open(rdir / "train.log", "a") as log, contextlib.redirect_stdout(log):
            train(cfg, progress=sys.stderr.isatty(), origin=origin)
        return
    cmd = torchrun_command(rdir / "config.toml", nproc)
    with open(rdir / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = (rdir / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise UserError(f"training of {rdir} failed (torchrun exit {rc}: {' '.join(tail)[:300]}), "
                        f"log {rdir / 'train.log'}; fix the cause and rerun the same command to resume")


def evaluate(ckpt: str, train_root: str, val_root: str, probe: bool = True, device: str = "cpu") -> dict:
    """Zero-shot retrieval (both directions, all 16 frames) on every clip of ``val_root`` and, when
    every clip has a label and ``probe``, the attention probe of the run's ``probe`` config section
    (the released head on the frozen encoder, final weight-averaged model) trained on ``train_root``
    and evaluated on ``val_root``."""
    import dataclasses

    import torch

    from tgdp.eval import common
    from tgdp.eval.probe import encode_labels, train_probe
    from tgdp.eval.probe_features import ProbeFeatures
    from tgdp.eval.retrieval import retrieval_metrics

    model, cfg = common.load_checkpoint(ckpt, device=device)

    def features(encoder, root: str):
        loader = common.make_retrieval_loader(cfg, root)
        return common.extract_video_features(encoder, loader, cfg.data.frames_per_clip, None, device)

    t0 = time.perf_counter()
    val = features(model, val_root)
    ret = retrieval_metrics(val.a, val.v, chunk=cfg.eval.chunk)
    out: dict = {"retrieval": {k: {m: ret[k][m] for m in ("R@1", "R@5", "R@10", "MR")} for k in ("v2a", "a2v")},
                 "num_val": ret["num_videos"], "num_frames": ret["num_frames"], "probe": None,
                 "retrieval_s": time.perf_counter() - t0}
    if not probe:
        return out
    if not all(val.labels) or not val.labels:
        out["probe_note"] = "skipped: the held-out clips are not all labelled"
        return out
    task = "multiclass" if all(len(lab) == 1 for lab in val.labels) else "multilabel"
    settings = dataclasses.replace(cfg.probe, task=task) if cfg.probe.task != task else cfg.probe
    encoder = ProbeFeatures(model, settings.head, settings.modality)
    train = features(encoder, train_root)
    if not all(train.labels):
        out["probe_note"] = "skipped: the training clips are not all labelled"
        return out
    pval = features(encoder, val_root) if settings.head != "tokens" else val
    y_tr, classes = encode_labels(train.labels, task)
    try:
        y_va, _ = encode_labels(pval.labels, task, classes)
    except ValueError as exc:
        out["probe_note"] = f"skipped: {exc}"
        return out
    with torch.enable_grad():
        res = train_probe((train.a, train.v, y_tr), (pval.a, pval.v, y_va), len(classes), settings, device)
    out["probe"] = {"metric": res.metric, "value": 100.0 * res.result, "chosen": res.chosen,
                    "head": settings.head, "num_train": len(train.ids), "num_classes": len(classes),
                    "epochs": settings.epochs}
    out["probe_s"] = time.perf_counter() - t0 - out["retrieval_s"]
    return out


def flops_per_step(cfg: Config) -> dict:
    """Counted FLOPs of one optimizer step (``tgdp.flops`` per sample × ``train.batch_size``)."""
    from tgdp.perf import train_flops_per_sample

    f = train_flops_per_sample(cfg, device="meta")
    b = cfg.train.batch_size
    return {"per_step": f["total"] * b, "teacher_per_step": f["teacher"] * b,
            "student_per_step": f["student_fwd_bwd"] * b, "batch": b}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(rdir: Path) -> Path:
    """Lock a run folder for this process (``ablate.lock`` holds the pid). A lock of a live process
    is a UserError (two studies on one folder); a dead process's lock is taken over."""
    rdir.mkdir(parents=True, exist_ok=True)
    lock = rdir / "ablate.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise UserError(f"run folder {rdir} is in use by process {pid} (another tgdp.ablate on the same "
                                "--out); wait for it, or use another --out") from None
            lock.unlink(missing_ok=True)      # left by a killed process
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    raise UserError(f"cannot lock {lock}; remove it if no tgdp.ablate is running")


def prepare(study: Study, spec: RunSpec) -> tuple[Config, Path, dict, dict | None]:
    """(config, run folder, fingerprint, result or None). A finished run returns its result; else
    the folder is checked (same settings), locked by the caller and set up (marker, config.toml)."""
    cfg = run_config(study, spec)
    rdir = run_dir(study, spec)
    fp = fingerprint(cfg, study)
    result_path = rdir / "result.json"
    if result_path.is_file():
        _check_same(result_path, fp)
        return cfg, rdir, fp, json.loads(result_path.read_text())
    marker = rdir / "ablate_run.json"
    if marker.is_file():
        _check_same(marker, fp)
    return cfg, rdir, fp, None


def execute(cfg: Config, rdir: Path, fp: dict, torchrun: int = 1, device: str = "cpu") -> dict:
    """Train (resuming from the run's checkpoint) and evaluate one prepared run; writes result.json."""
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rdir / "ablate_run.json", fp)
    atomic_write_text(rdir / "config.toml", to_toml(cfg))
    steps, ev_settings = cfg.train.steps, fp["eval"]
    t0 = time.perf_counter()
    _train(cfg, rdir, torchrun)
    t_train = time.perf_counter() - t0
    summary_path = rdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    ckpt = summary.get("checkpoint")
    if summary.get("steps") != steps or not ckpt or not Path(ckpt).is_file():
        raise UserError(f"training of {rdir} did not finish {steps} steps ({summary_path}: steps "
                        f"{summary.get('steps')}, checkpoint {ckpt}); rerun the same command to resume")
    t1 = time.perf_counter()
    ev = evaluate(ckpt, cfg.data.root, ev_settings["val_data"], probe=ev_settings["probe"], device=device)
    result = {"variant": rdir.parent.name, "seed": cfg.train.seed, **ev, "steps": steps, "checkpoint": ckpt,
              "train_s": t_train, "eval_s": time.perf_counter() - t1,
              "resumed_from": summary.get("resumed_from", 0), "train_samples_per_s": summary.get("samples_per_s"),
              "nonfinite_steps": summary.get("nonfinite_steps"), "fingerprint": fp}
    atomic_write_json(rdir / "result.json", result)
    return result


def run_one(study: Study, spec: RunSpec, device: str = "cpu") -> tuple[dict, bool]:
    """Train + evaluate one run in this process unless it is finished; returns (result, ran)."""
    cfg, rdir, fp, done = prepare(study, spec)
    if done is not None:
        return done, False
    lock = acquire(rdir)
    try:
        return execute(cfg, rdir, fp, study.torchrun, device), True
    finally:
        lock.unlink(missing_ok=True)


def worker_command(rdir: Path, torchrun: int, device: str) -> list[str]:
    """The child process of ``--jobs N``: ``python -m tgdp.ablate.runner RUN_DIR`` (prepared folder)."""
    return [sys.executable, "-m", "tgdp.ablate.runner", str(rdir), "--torchrun", str(torchrun), "--device", device]


def _worker(argv: list[str]) -> int:
    import argparse

    from tgdp.configs import from_dict

    ap = argparse.ArgumentParser(prog="python -m tgdp.ablate.runner",
                                 description="train + evaluate one prepared run folder of a tgdp.ablate study")
    ap.add_argument("run_dir")
    ap.add_argument("--torchrun", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    rdir = Path(args.run_dir)
    fp = json.loads((rdir / "ablate_run.json").read_text())
    cfg = from_dict(fp["config"]).validate()
    execute(cfg, rdir, fp, args.torchrun, args.device)
    return 0


if __name__ == "__main__":
    from tgdp.cli import run

    sys.exit(run("tgdp.ablate", _worker))
