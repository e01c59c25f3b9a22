"""Run observability on rank 0: tqdm progress bar, JSONL + CSV metrics, TensorBoard scalars, summary.

Everything here runs at log steps only, on host values the loop has already fetched in one sync.
Other ranks get a logger whose methods do nothing, so the loop never branches on the rank.

Logs belong to one run: every row carries the run id. A fresh run starts new files (the trainer
has made sure no other run's files are there); a resumed run keeps its own rows up to the step it
resumes from and drops the later ones (they were logged after the checkpoint it continues from and
are about to be logged again), so a log never holds a step twice and curves never run backwards.
TensorBoard events after that step are purged the same way (``purge_step``). ``metrics.jsonl`` is
the record; ``metrics.csv`` has the same rows with fixed columns (skip counts as one
``reason=count;…`` column).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

from tgdp.atomic import atomic_write_json, atomic_write_text

__all__ = ["RunLogger", "peak_flops", "read_metrics"]

# Dense bf16 tensor-core peak (no sparsity), FLOP/s; used for the MFU estimate only.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of ``device`` if it is a known GPU, else None (no MFU on CPU)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in _PEAK_BF16.items():
        if key in name:
            return val
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (a torn last line of a killed run is left out)."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break
    return rows


def _csv_value(v):
    if isinstance(v, dict):
        return ";".join(f"{k}={n}" for k, n in v.items())
    return v


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(v) for k, v in r.items()})
    return buf.getvalue()


class RunLogger:
    """Writes ``metrics.jsonl``, ``metrics.csv``, ``tb/`` (TensorBoard) and a progress bar under ``out_dir``.

    ``run_id`` goes into every row; ``resume``: continue this run's files from ``start_step`` (rows
    of later steps are dropped), else start new ones.
    """

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, run_id: str | None = None, resume: bool = False):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.run_id = run_id
        self.rows: list[dict] = []
        self._bar = self._tb = None
        self._fields: list[str] | None = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._jsonl_path, self._csv_path = self.out / "metrics.jsonl", self.out / "metrics.csv"
        self._jsonl = self._csv_fh = None    # opened at the first row: a run that logs nothing leaves no files
        self._kept: list[dict] = []
        if resume and self._jsonl_path.is_file():
            self._kept = [r for r in read_metrics(self._jsonl_path) if r.get("run_id") in (run_id, None)
                          and isinstance(r.get("step"), int) and r["step"] <= start_step]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if resume else None)
            except ImportError:  # tensorboard is optional
                self._tb = None
        if progress:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                                 mininterval=1.0, desc="train")
            except ImportError:
                self._bar = None
        self._t0 = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        """Host-only progress tick (no device access)."""
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "run_id": self.run_id,
               **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}}
        self.rows.append(row)
        try:
            if self._jsonl is None:
                self._open(row)
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            csv.DictWriter(self._csv_fh, fieldnames=self._fields, extrasaction="ignore", restval="").writerow(
                {k: _csv_value(v) for k, v in row.items()})
            self._csv_fh.flush()
        except OSError as exc:   # disk full, quota: one line naming the log
            raise type(exc)(exc.errno, exc.strerror or str(exc), str(self._jsonl_path)) from exc
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "samples_per_s") if k in metrics},
                                  refresh=False)

    def _open(self, first: dict) -> None:
        """Start the files with this run's kept rows (resume) or empty, atomically, then append."""
        self._fields = list(self._kept[0]) if self._kept else list(first)
        atomic_write_text(self._jsonl_path, "".join(json.dumps(r) + "\n" for r in self._kept))
        atomic_write_text(self._csv_path, _csv_text(self._kept, self._fields))
        self._jsonl = open(self._jsonl_path, "a")
        self._csv_fh = open(self._csv_path, "a", newline="")

    def summary(self, data: dict) -> Path | None:
        if not self.enabled:
            return None
        path = self.out / "summary.json"
        atomic_write_json(path, data)
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        for fh in (self._jsonl, self._csv_fh):
            if fh is not None:
                fh.close()
