"""A run owns its output folder: run ids, the start-up decision (fresh / resume / refuse), moving an
old run's files aside, and the config differences of a resume.

Every run gets an id (:func:`new_run_id`) that is sealed into its checkpoints, written into
``latest``, every metrics row and ``summary.json``. :func:`claim` runs on rank 0 before any model is
built or any data decoded:

- ``train.resume`` and the folder holds a checkpoint: resume it (the caller loads it).
- otherwise the folder must hold no run files (:data:`RUN_FILES`): a fresh run there would mix its
  checkpoints and logs with another run's, so it is refused with one line naming the choices
  (``--train.resume true``, another ``--train.out_dir``, ``--train.overwrite true``).
- ``train.overwrite``: the old run's files are *moved* to ``<out_dir>/replaced/<time>-<old run id>/``
  (never deleted), then the run starts fresh.

Files in the folder that are not run files (anything of the user's) are left where they are.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from tgdp.cli import UserError
from tgdp.training.checkpoint import CheckpointManager

__all__ = ["RUN_FILES", "new_run_id", "run_files", "free_folder", "claim", "config_diff", "flatten"]

# What a tgdp run writes into its out_dir (the demo's report files included).
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.csv", "summary.json", "tb", "loss_curves.png",
             "report.json", "report.md", "tsne_val.png")


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: readable, sortable by start time, unique (24 random bits)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def run_files(out: Path) -> list[str]:
    """The run files present in ``out`` (a ``checkpoints/`` folder counts only when it holds something)."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if name == "checkpoints":
            if p.is_dir() and any(not c.name.startswith(".tmp-") for c in p.iterdir()):
                found.append(name)
        elif p.exists():
            found.append(name)
    return found


def free_folder(out: Path) -> Path:
    """``out`` if it holds no run files, else the first of ``out-2``, ``out-3``, … that holds none
    (the main job's default folder: a second ``python -m tgdp.train`` writes next to the first run,
    never into it)."""
    cand, n = out, 1
    while run_files(cand):
        n += 1
        cand = out.with_name(f"{out.name}-{n}")
    return cand


def _previous_run(out: Path, ckpt: CheckpointManager) -> str | None:
    rid = ckpt.folder_run()
    if rid is None and (out / "summary.json").is_file():
        import json
        try:
            rid = json.loads((out / "summary.json").read_text()).get("run_id")
        except (ValueError, OSError, AttributeError):
            rid = None
    return rid


def claim(out: Path, ckpt: CheckpointManager, *, resume: bool, overwrite: bool) -> tuple[str, bool, list[str]]:
    """Decide how this run starts in ``out`` -> ``(run id or "", resume?, notes)``.

    Returns ``(fresh id, False, notes)`` for a fresh run and ``("", True, notes)`` for a resume (the
    id then comes from the checkpoint). Raises :class:`tgdp.cli.UserError` when ``out`` holds
    another run's files and neither resume nor overwrite was asked for.
    """
    notes: list[str] = []
    found = run_files(out)
    has_ckpt = bool(ckpt.checkpoints())
    if resume and has_ckpt:
        return "", True, notes
    if found:
        prev = _previous_run(out, ckpt)
        who = f"run {prev}" if prev else "another run (or files tgdp did not write)"
        if not overwrite:
            what = "no checkpoint to resume, but" if resume else "already"
            raise UserError(
                f"{out} {what} holds files of {who} ({', '.join(found)}); to continue that run pass "
                f"--train.resume true, to start a new run pass another --train.out_dir, or pass "
                f"--train.overwrite true to move the old files to {out / 'replaced'}/")
        base = out / "replaced" / f"{time.strftime('%Y%m%d-%H%M%S')}-{prev or 'unknown'}"
        dest, n = base, 1
        while dest.exists():
            n += 1
            dest = base.with_name(f"{base.name}-{n}")
        dest.mkdir(parents=True)
        for name in found:
            (out / name).rename(dest / name)
        notes.append(f"train.overwrite: moved the files of {who} ({', '.join(found)}) to {dest}")
    elif resume:
        notes.append("train.resume: no checkpoint found, starting from scratch")
    return new_run_id(), False, notes


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Fields that legitimately differ between a run and its resume.
_RESUME_FIELDS = ("train.resume", "train.overwrite")


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"section.field: saved -> current"`` for every field that differs (resume switches excluded)."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in _RESUME_FIELDS:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, list):
            va = tuple(va)
        if isinstance(vb, list):
            vb = tuple(vb)
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out
