"""Run observability on rank 0: tqdm progress bar, JSONL + CSV metrics, TensorBoard scalars, summary.

Everything here runs at log steps only, on host values the loop has already fetched in one sync.
Other ranks get a logger whose methods do nothing, so the loop never branches on the rank.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from tgdp.atomic import atomic_write_json

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
    """Rows of a ``metrics.jsonl`` file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class RunLogger:
    """Writes ``metrics.jsonl``, ``metrics.csv``, ``tb/`` (TensorBoard) and a progress bar under ``out_dir``."""

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.rows: list[dict] = []
        self._bar = self._tb = self._csv = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out / "metrics.jsonl", "a")
        self._csv_fh = open(self.out / "metrics.csv", "a", newline="")
        self._csv_header = self._csv_fh.tell() == 0
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out / "tb"))
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
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()}}
        self.rows.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        w = csv.DictWriter(self._csv_fh, fieldnames=list(row))
        if self._csv_header:
            w.writeheader()
            self._csv_header = False
        w.writerow(row)
        self._csv_fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "samples_per_s") if k in metrics},
                                  refresh=False)

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
        self._jsonl.close()
        self._csv_fh.close()
