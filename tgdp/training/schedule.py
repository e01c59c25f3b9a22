"""Per-iteration learning-rate schedule: linear warmup, then cosine to a floor (CAV-MAE Sync dev recipe).

``lr(s) = lr · (s + 1) / W`` for ``s < W = round(warmup_frac · total)``, then
``lr_min + (lr − lr_min) · ½ (1 + cos(π (s − W) / (total − W)))`` with ``lr_min = min_lr_ratio · lr``,
where ``s`` is the 0-based index of the optimizer step about to be taken. Host-side floats only: the
schedule never touches a device tensor, so setting it costs no sync.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "WarmupCosine"]


def lr_at(step: int, total: int, base_lr: float, warmup_frac: float, min_lr_ratio: float) -> float:
    """Learning rate for 0-based optimizer step ``step`` of ``total``."""
    if total < 1:
        raise ValueError(f"total={total!r} must be >= 1")
    if step < 0:
        raise ValueError(f"step={step!r} must be >= 0")
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac={warmup_frac!r} must be in [0, 1)")
    warm = int(round(warmup_frac * total))
    if step < warm:
        return base_lr * (step + 1) / warm
    lr_min = min_lr_ratio * base_lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return lr_min + (base_lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets ``param_group['lr']`` for each optimizer step; its only state is the step counter."""

    def __init__(self, optimizer, total: int, base_lr: float, warmup_frac: float, min_lr_ratio: float):
        self.optimizer, self.total, self.base_lr = optimizer, total, base_lr
        self.warmup_frac, self.min_lr_ratio = warmup_frac, min_lr_ratio
        self.step_num = 0
        self._apply()

    @property
    def lr(self) -> float:
        return lr_at(min(self.step_num, self.total - 1), self.total, self.base_lr, self.warmup_frac,
                     self.min_lr_ratio)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr

    def step(self) -> None:
        """Advance after an optimizer step (taken or skipped: the schedule follows iterations)."""
        self.step_num += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "total": self.total, "base_lr": self.base_lr,
                "warmup_frac": self.warmup_frac, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step_num"])
        self._apply()
