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

import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgdp.ablate.variants import Variant, resolve
from tgdp.atomic import atomic_write_json, atomic_write_text
from tgdp.cli import UserError
from tgdp.configs import Config, apply_overrides, to_dict

__all__ = ["Study", "RunSpec", "run_config", "run_dir", "to_toml", "fingerprint", "run_one", "evaluate",
           "flops_per_step", "torchrun_command"]


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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)          # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The full config as TOML that :func:`tgdp.configs.load` reads back to the same config."""
    d = to_dict(cfg)
    lines = [f"preset = {_toml_value(d.pop('preset'))}"]
    for section, values in d.items():
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


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
    if nproc <= 1:
        from tgdp.train import train
        train(cfg, progress=sys.stderr.isatty())
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
    every clip has a label and ``probe``, the attention probe trained on ``train_root`` features
    (:class:`tgdp.eval.probe.ProbeSettings` defaults, final epoch) evaluated on ``val_root``."""
    import torch

    from tgdp.eval import common
    from tgdp.eval.probe import ProbeSettings, encode_labels, train_probe
    from tgdp.eval.retrieval import retrieval_metrics

    model, cfg = common.load_checkpoint(ckpt, device=device)

    def features(root: str):
        loader = common.make_retrieval_loader(cfg, root)
        return common.extract_video_features(model, loader, cfg.data.frames_per_clip, None, device)

    val = features(val_root)
    ret = retrieval_metrics(val.a, val.v, chunk=cfg.eval.chunk)
    out: dict = {"retrieval": {k: {m: ret[k][m] for m in ("R@1", "R@5", "R@10", "MR")} for k in ("v2a", "a2v")},
                 "num_val": ret["num_videos"], "num_frames": ret["num_frames"], "probe": None}
    if not probe:
        return out
    if not all(val.labels) or not val.labels:
        out["probe_note"] = "skipped: the held-out clips are not all labelled"
        return out
    train = features(train_root)
    if not all(train.labels):
        out["probe_note"] = "skipped: the training clips are not all labelled"
        return out
    task = "multiclass" if all(len(lab) == 1 for lab in train.labels + val.labels) else "multilabel"
    y_tr, classes = encode_labels(train.labels, task)
    try:
        y_va, _ = encode_labels(val.labels, task, classes)
    except ValueError as exc:
        out["probe_note"] = f"skipped: {exc}"
        return out
    settings = ProbeSettings(task=task)
    with torch.enable_grad():
        res = train_probe((train.a, train.v, y_tr), (val.a, val.v, y_va), len(classes), settings, device)
    out["probe"] = {"metric": res.metric, "value": 100.0 * res.history[-1][res.metric],
                    "num_train": len(train.ids), "num_classes": len(classes), "epochs": settings.epochs}
    return out


def flops_per_step(cfg: Config) -> dict:
    """Counted FLOPs of one optimizer step (``tgdp.flops`` per sample × ``train.batch_size``)."""
    from tgdp.perf import train_flops_per_sample

    f = train_flops_per_sample(cfg, device="meta")
    b = cfg.train.batch_size
    return {"per_step": f["total"] * b, "teacher_per_step": f["teacher"] * b,
            "student_per_step": f["student_fwd_bwd"] * b, "batch": b}


def run_one(study: Study, spec: RunSpec, device: str = "cpu") -> tuple[dict, bool]:
    """Train + evaluate one run unless it is finished; returns (result, ran)."""
    cfg = run_config(study, spec)
    rdir = run_dir(study, spec)
    fp = fingerprint(cfg, study)
    result_path = rdir / "result.json"
    if result_path.is_file():
        _check_same(result_path, fp)
        return json.loads(result_path.read_text()), False
    marker = rdir / "ablate_run.json"
    if marker.is_file():
        _check_same(marker, fp)
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, fp)
    atomic_write_text(rdir / "config.toml", to_toml(cfg))

    t0 = time.perf_counter()
    _train(cfg, rdir, study.torchrun)
    t_train = time.perf_counter() - t0
    summary_path = rdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    ckpt = summary.get("checkpoint")
    if summary.get("steps") != study.steps or not ckpt or not Path(ckpt).is_file():
        raise UserError(f"training of {rdir} did not finish {study.steps} steps ({summary_path}: steps "
                        f"{summary.get('steps')}, checkpoint {ckpt}); rerun the same command to resume")
    t1 = time.perf_counter()
    ev = evaluate(ckpt, study.data, study.val_data, probe=study.probe, device=device)
    result = {"variant": spec.variant.name, "seed": spec.seed, **ev, "steps": study.steps,
              "checkpoint": ckpt, "train_s": t_train, "eval_s": time.perf_counter() - t1,
              "resumed_from": summary.get("resumed_from", 0), "train_samples_per_s": summary.get("samples_per_s"),
              "nonfinite_steps": summary.get("nonfinite_steps"), "fingerprint": fp}
    atomic_write_json(result_path, result)
    return result, True
