"""What every gpucheck step shares: its context (mode, folders, sizes), results, error budgets."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Context", "result", "fp32_close", "bf16_budget", "rel_l2", "BF16_FACTOR", "FP32_TOL"]

FP32_TOL = 1e-5        # fp32 parity: |got - want| <= FP32_TOL + FP32_TOL * |want|
BF16_FACTOR = 2.0      # bf16: error vs fp32 <= BF16_FACTOR x plain torch's bf16 error (+ an atol)


@dataclass
class Context:
    """mode: "gpu" | "cpu-smoke"; out: this run's folder; shards: generated shards (``train/``, ``val/``);
    settings: the step's sizes from :data:`tgdp.gpucheck.plan.PROFILES`; result_path: where the step's
    result (and its progress while it runs) is written."""

    mode: str
    out: Path
    shards: Path
    settings: dict
    result_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def smoke(self) -> bool:
        return self.mode == "cpu-smoke"

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.smoke else "cuda")

    def progress(self, phase: str, **info) -> None:
        """Record what the step is doing now: if it times out, the report says where."""
        from tgdp.atomic import atomic_write_json

        atomic_write_json(self.result_path, {"status": "running", "phase": phase,
                                             "elapsed_s": round(time.monotonic() - self.started, 2), **info})

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "out": str(self.out), "shards": str(self.shards),
                           "settings": self.settings, "result_path": str(self.result_path)})

    @classmethod
    def from_json(cls, text: str) -> "Context":
        d = json.loads(text)
        return cls(d["mode"], Path(d["out"]), Path(d["shards"]), d["settings"], Path(d["result_path"]))


def result(ok: bool, summary: str, **details) -> dict:
    return {"status": "pass" if ok else "fail", "summary": summary, "details": details}


def fp32_close(got, want, tol: float = FP32_TOL) -> tuple[bool, float]:
    """(|got - want| <= tol + tol |want| everywhere, max |got - want|) (torch.testing's rule)."""
    import torch

    got, want = got.double(), want.double()
    diff = (got - want).abs()
    ok = bool(torch.all(diff <= tol + tol * want.abs())) and bool(torch.isfinite(got).all())
    return ok, float(diff.max()) if diff.numel() else 0.0


def bf16_budget(got, exact, plain, atol: float = 1e-5) -> tuple[bool, float, float]:
    """Max-abs error of ``got`` and of plain torch (``plain``) against ``exact``; ok when
    err(got) <= BF16_FACTOR x err(plain) + atol. Returns (ok, err, torch_err)."""
    import torch

    exact = exact.double()
    err = float((got.double() - exact).abs().max())
    torch_err = float((plain.double() - exact).abs().max())
    ok = err <= BF16_FACTOR * torch_err + atol and bool(torch.isfinite(got).all())
    return ok, err, torch_err


def rel_l2(x, ref) -> float:
    """||x - ref|| / ||ref|| in fp64 (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    den = float(ref.norm())
    num = float((x - ref).norm())
    return num / den if den > 0 else num

