"""The ``probe`` config section: the attention probe on frozen features (``python -m tgdp.eval
probe``), and the per-task columns of supplement Table 1. Re-exported by :mod:`tgdp.configs`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from tgdp.config_io import ConfigError, check as _check

__all__ = ["ProbeConfig", "PROBE_TASKS", "probe_task"]


@dataclass(frozen=True)
class ProbeConfig:
    """Attention probe on frozen per-frame features (supplement §1.4 and Table 1, VGGSound column;
    :data:`PROBE_TASKS` holds both columns). ``python -m tgdp.eval probe`` reads this section."""

    # official = CAVMAEFT 'self_attention_cls' of the released model file: one token per frame,
    # concat(CLS_a, CLS_v) after the modality-specific blocks, un-normed; tokens = our earlier head
    head: Literal["official", "tokens"] = "official"
    modality: Literal["both", "audio", "video"] = "both"
    task: Literal["multiclass", "multilabel"] = "multiclass"   # CE + top-1 / BCE + mAP
    epochs: int = 10
    batch_size: int = 48
    lr: float = 1e-3
    warmup_epochs: float = 1.0       # linear warmup per step, then cosine
    min_lr_ratio: float = 0.0        # ASSUMPTION: cosine to 0 (the floor is unpublished)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 5e-7       # CAV-MAE fine-tuning code: Adam weight_decay 5e-7 (coupled)
    betas: tuple[float, float] = (0.95, 0.999)
    class_balanced: bool = True      # sample weight = sum over labels of 1 / class count (CAV-MAE)
    mixup: float = 0.5               # probability (CAV-MAE scripts); lam ~ Beta(mixup_beta, mixup_beta)
    mixup_beta: float = 10.0
    label_smooth: float = 0.1        # CAV-MAE scripts
    wa: bool = True                  # average the weights of epochs wa_start..wa_end (1-based, inclusive)
    wa_start: int = 3                # CAV-MAE scripts
    wa_end: int = 0                  # 0 = the last epoch (the scripts set it to the epoch count)
    # The reported figure: "final" = the last (or weight-averaged) model; "val" = the candidate
    # (each epoch, and the average) best on a split of val_frac carved from the TRAINING data.
    select: Literal["final", "val"] = "final"
    val_frac: float = 0.1
    depth: int = 2
    num_heads: int = 12
    seed: int = 0

    def validate(self, prefix: str = "probe") -> None:
        for name in ("epochs", "batch_size", "depth", "num_heads", "wa_start"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _check(0 <= self.warmup_epochs < self.epochs, f"{prefix}.warmup_epochs", self.warmup_epochs,
               f"must be in [0, epochs={self.epochs})")
        for name in ("min_lr_ratio", "mixup"):
            _check(0 <= getattr(self, name) <= 1, f"{prefix}.{name}", getattr(self, name), "must be in [0, 1]")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.mixup_beta > 0, f"{prefix}.mixup_beta", self.mixup_beta, "must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
               self.betas, "must be two values in [0, 1)")
        _check(0 <= self.label_smooth < 1, f"{prefix}.label_smooth", self.label_smooth, "must be in [0, 1)")
        last = self.wa_end or self.epochs
        _check(not self.wa or self.wa_start <= last <= self.epochs, f"{prefix}.wa_start", self.wa_start,
               f"must be <= wa_end (0 = last) <= epochs={self.epochs}; got wa_end={self.wa_end}")
        _check(0 < self.val_frac < 1, f"{prefix}.val_frac", self.val_frac, "must be in (0, 1)")


# Supplement Table 1, per probing task (Adam, cosine and batch 48 are common to both).
PROBE_TASKS: dict[str, dict[str, Any]] = {
    "vggsound": dict(task="multiclass", lr=1e-3, epochs=10, warmup_epochs=1.0, batch_size=48,
                     class_balanced=True, mixup=0.5, wa=True, wa_end=0),
    "audioset": dict(task="multilabel", lr=5e-2, epochs=15, warmup_epochs=1.5, batch_size=48,
                     class_balanced=False, mixup=0.5, wa=True, wa_end=0),
}


def probe_task(name: str, probe: ProbeConfig | None = None) -> ProbeConfig:
    """``probe`` (default :class:`ProbeConfig`) with the Table 1 column of task ``name``; the head
    fields (head, modality, depth, num_heads) and the seed are kept."""
    if name not in PROBE_TASKS:
        raise ConfigError(f"probe task={name!r} is unknown; choose one of {sorted(PROBE_TASKS)}")
    out = dataclasses.replace(probe or ProbeConfig(), **PROBE_TASKS[name])
    out.validate()
    return out
