"""The EMA teacher (TG-DP §3 of the spec; the paper's momentum is unpublished).

ASSUMPTION (documented in the config): ``theta_t <- m * theta_t + (1 - m) * theta_s`` over every
parameter, after each optimizer step, with m constant 0.999 by default or a cosine ramp to
``teacher.momentum_end``. Buffers (the fixed pos tables) are copied.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from tgdp.configs import TeacherConfig

__all__ = ["EMATeacher", "momentum_at"]


def momentum_at(cfg: TeacherConfig, step: int, total_steps: int) -> float:
    """EMA momentum for ``step`` in [0, total_steps]: constant, or cosine from momentum to momentum_end."""
    if cfg.schedule == "constant":
        return cfg.momentum
    if cfg.schedule == "cosine":
        if total_steps <= 0:
            raise ValueError(f"total_steps={total_steps} must be > 0 for the cosine momentum schedule")
        frac = min(max(step / total_steps, 0.0), 1.0)
        return cfg.momentum_end - (cfg.momentum_end - cfg.momentum) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"teacher.schedule={cfg.schedule!r} must be 'constant' or 'cosine'")


def _unwrap(m: nn.Module) -> nn.Module:
    # DDP wraps as .module, torch.compile as ._orig_mod: update against the plain module.
    while True:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            m = m.module
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        else:
            return m


class EMATeacher(nn.Module):
    """A frozen deep copy of the student (``self.module``), always in eval mode, never trained."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(_unwrap(student))
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher stays in eval mode whatever its parent does.
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """theta_t <- m * theta_t + (1 - m) * theta_s (foreach lerp); buffers copied from the student."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum!r} must be in [0, 1]")
        student = _unwrap(student)
        t_params = list(self.module.parameters())
        s_params = [p.detach() for p in student.parameters()]
        if len(t_params) != len(s_params):
            raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
        if t_params:
            # lerp(t, s, w) = t + w * (s - t) = m * t + (1 - m) * s with w = 1 - m.
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        for tb, sb in zip(self.module.buffers(), student.buffers()):
            tb.copy_(sb)
