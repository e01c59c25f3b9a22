"""Attention probe on frozen per-frame globals (paper §4.2, supplement §1.4 / Table 1).

For each video the frozen encoders give per-frame globals ``g_a[t], g_v[t]`` (t < T = 16). The
probe builds a token sequence from them: modality ``m`` in {audio, video} (both, or one for the
unimodal probes), each token ``g_m[t] + E_mod[m] + E_frame[t]`` (learned embeddings), prepends
a learnable CLS, runs a 2-layer pre-norm transformer, and classifies the CLS output with a linear
head. Inputs are standardised per dimension with training-set statistics (ASSUMPTION, MAE's
linear-probe BatchNorm without affine). ASSUMPTION: one token per (frame, modality) (the paper's "concatenated" sequence) rather
than one 2D-wide token per frame; the official probing code is unreleased.

Tasks: ``multilabel`` (AudioSet-style: BCE, metric mAP) and ``multiclass`` (VGGSound-style: CE,
metric top-1). Optimiser Adam (betas 0.95, 0.999), per-step schedule: linear warmup then cosine.
Mixup (ASSUMPTION, CAV-MAE loader style): with probability ``mixup`` a sample is mixed with a
random partner of the batch, ``lam ~ Beta(10, 10)``, inputs and targets mixed alike.

mAP: mean over classes of average precision; a class with no positive in the evaluated set is
excluded (its AP is undefined), and a set with no positive at all raises ValueError. AP uses the
step (threshold) definition of scikit-learn: tied scores form one threshold, AP = sum over
thresholds of (recall increase) x (precision at the threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProbeSettings", "AttentionProbe", "ProbeResult", "average_precision", "mean_average_precision",
           "top1_accuracy", "encode_labels", "stratified_split", "train_probe", "evaluate_probe"]


@dataclass(frozen=True)
class ProbeSettings:
    """Probe hyper-parameters (defaults: VGGSound column of supplement Table 1, mixup off).

    The presets :meth:`vggsound` / :meth:`audioset` turn mixup on at 0.5 (ASSUMPTION: Table 1 says
    only "Mixup: Yes"; 0.5 is CAV-MAE's fine-tuning value). Weight averaging (Table 1: "Yes") is
    not implemented: the per-epoch metrics of the final weights are reported.
    """

    task: Literal["multiclass", "multilabel"] = "multiclass"
    modality: Literal["both", "audio", "video"] = "both"
    epochs: int = 10
    batch_size: int = 48
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 0.0
    mixup: float = 0.0               # probability of mixing a sample (0 = off)
    mixup_beta: float = 10.0         # lam ~ Beta(mixup_beta, mixup_beta) (CAV-MAE)
    depth: int = 2
    num_heads: int = 8
    seed: int = 0

    def validate(self) -> "ProbeSettings":
        checks = [
            (self.task in ("multiclass", "multilabel"), "task", "must be 'multiclass' or 'multilabel'"),
            (self.modality in ("both", "audio", "video"), "modality", "must be 'both', 'audio' or 'video'"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.lr > 0, "lr", "must be > 0"),
            (0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be in [0, epochs)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (0 <= self.mixup <= 1, "mixup", "must be in [0, 1]"),
            (self.mixup_beta > 0, "mixup_beta", "must be > 0"),
            (self.depth >= 1, "depth", "must be >= 1"),
            (self.num_heads >= 1, "num_heads", "must be >= 1"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"probe.{name}={getattr(self, name)!r} {why}")
        return self

    @classmethod
    def vggsound(cls, **overrides) -> "ProbeSettings":
        """VGG LP column of supplement Table 1 (CE, top-1); ``overrides`` replace any field."""
        base = dict(task="multiclass", epochs=10, batch_size=48, lr=1e-3, warmup_epochs=1.0, mixup=0.5)
        return cls(**{**base, **overrides}).validate()

    @classmethod
    def audioset(cls, **overrides) -> "ProbeSettings":
        """AS20K LP column of supplement Table 1 (BCE, mAP); ``overrides`` replace any field."""
        base = dict(task="multilabel", epochs=15, batch_size=48, lr=5e-2, warmup_epochs=1.5, mixup=0.5)
        return cls(**{**base, **overrides}).validate()


class AttentionProbe(nn.Module):
    """CLS + per-(frame, modality) tokens -> 2-layer transformer -> linear head.

    forward(a, v): a, v [B, T, D] (either may be None if the probe is unimodal) -> logits [B, C].
    """

    def __init__(self, dim: int, num_classes: int, num_frames: int = 16, modality: str = "both",
                 depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"probe dim={dim} must be divisible by num_heads={num_heads}")
        if num_classes < 1 or num_frames < 1:
            raise ValueError(f"num_classes={num_classes} and num_frames={num_frames} must be >= 1")
        self.modality = modality
        self.mods = {"both": ("audio", "video"), "audio": ("audio",), "video": ("video",)}[modality]
        self.num_frames = num_frames
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.mod_embed = nn.Parameter(torch.zeros(len(self.mods), 1, dim))
        self.frame_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        for p in (self.cls, self.mod_embed, self.frame_embed):
            nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        # Per-dimension input standardisation with training-set statistics (set_input_stats), like
        # the affine-free BatchNorm in front of MAE's linear probe: frozen globals early in
        # pretraining share a large common component that would otherwise swamp the class signal.
        self.register_buffer("in_mean", torch.zeros(len(self.mods), dim))
        self.register_buffer("in_std", torch.ones(len(self.mods), dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def set_input_stats(self, a: torch.Tensor | None, v: torch.Tensor | None, eps: float = 1e-6) -> None:
        """Store per-dimension mean / std over (videos, frames) of the training features a, v: [N, T, D]."""
        given = {"audio": a, "video": v}
        for i, m in enumerate(self.mods):
            x = given[m].reshape(-1, given[m].shape[-1]).float()
            self.in_mean[i] = x.mean(0)
            self.in_std[i] = x.std(0, unbiased=False) + eps

    def forward(self, a: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        given = {"audio": a, "video": v}
        seqs = []
        for i, m in enumerate(self.mods):
            x = given[m]
            if x is None or x.ndim != 3 or x.shape[1] != self.num_frames:
                shape = None if x is None else tuple(x.shape)
                raise ValueError(f"{m} input must be [B, {self.num_frames}, D], got {shape}")
            x = (x - self.in_mean[i]) / self.in_std[i]
            seqs.append(x + self.mod_embed[i] + self.frame_embed)     # [B, T, D]
        x = torch.cat(seqs, dim=1)                                     # [B, M*T, D]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+M*T, D]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------- metrics

def average_precision(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AP of one class. scores: [N] float, target: [N] {0, 1}; needs >= 1 positive. Returns a 0-d fp64."""
    s = scores.double()
    y = target.double()
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    tp = torch.cumsum(y, 0)
    rank = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    # Last position of every group of tied scores = one threshold.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp_t, prec_t = tp[last], tp[last] / rank[last]
    d_tp = torch.diff(tp_t, prepend=tp_t.new_zeros(1))
    return (d_tp * prec_t).sum() / tp[-1]


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over classes with >= 1 positive. scores, targets: [N, C]."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be [N, C]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN/Inf; refusing to compute mAP")
    pos = targets.sum(0) > 0
    if not bool(pos.any()):
        raise ValueError("no class has a positive sample; mAP is undefined")
    aps = [average_precision(scores[:, c], targets[:, c]) for c in pos.nonzero().flatten().tolist()]
    return float(torch.stack(aps).mean())


def top1_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """logits [N, C], target [N] long -> fraction (0..1) with argmax == target."""
    if logits.ndim != 2 or target.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, C] with N >= 1 and target [N], "
                         f"got target {tuple(target.shape)}")
    return float((logits.argmax(1) == target).double().mean())


# ----------------------------------------------------------------------------- labels

def encode_labels(labels: list[list[str]], task: str, classes: list[str] | None = None
                  ) -> tuple[torch.Tensor, list[str]]:
    """Class names -> targets. multiclass: [N] long (exactly one label each); multilabel: [N, C] float.

    ``classes`` (default: sorted union of ``labels``) fixes the index order; an unknown label
    raises ValueError naming it.
    """
    if not labels:
        raise ValueError("empty label list")
    if classes is None:
        classes = sorted({c for lab in labels for c in lab})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for lab in labels for c in lab if c not in index})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not among the {len(classes)} training classes")
    if task == "multiclass":
        bad = [i for i, lab in enumerate(labels) if len(lab) != 1]
        if bad:
            raise ValueError(f"multiclass probing needs exactly one label per video; sample {bad[0]} "
                             f"has {labels[bad[0]]!r} ({len(bad)} such samples)")
        return torch.tensor([index[lab[0]] for lab in labels], dtype=torch.long), classes
    y = torch.zeros(len(labels), len(classes))
    for i, lab in enumerate(labels):
        y[i, [index[c] for c in lab]] = 1.0
    return y, classes


def stratified_split(labels: list[list[str]], val_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) indices; per first label, ~val_frac of the samples go to val, >= 1 stays in train."""
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac={val_frac} must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab[0] if lab else "", []).append(i)
    train, val = [], []
    for key in sorted(groups):
        idx = [groups[key][j] for j in torch.randperm(len(groups[key]), generator=g).tolist()]
        k = min(int(round(len(idx) * val_frac)), len(idx) - 1)
        val += idx[:k]
        train += idx[k:]
    if not val:
        raise ValueError(f"val_frac={val_frac} leaves no validation sample among {len(labels)}")
    return sorted(train), sorted(val)


# ----------------------------------------------------------------------------- training

@dataclass
class ProbeResult:
    model: AttentionProbe
    history: list[dict] = field(default_factory=list)   # one dict per epoch
    settings: dict = field(default_factory=dict)
    metric: str = "top1"

    @property
    def best(self) -> float:
        return max(h[self.metric] for h in self.history)


def _lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    return f


def _loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    return -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()   # soft targets (mixup)


@torch.no_grad()
def evaluate_probe(model: AttentionProbe, a: torch.Tensor, v: torch.Tensor, y: torch.Tensor, task: str,
                   batch_size: int = 256) -> dict:
    """{"loss", "mAP" or "top1"} on a feature set (a, v [N, T, D]; y as from encode_labels)."""
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat([model(a[i:i + batch_size].to(dev), v[i:i + batch_size].to(dev)).float()
                        for i in range(0, len(a), batch_size)])
    y = y.to(dev)
    if task == "multilabel":
        return {"loss": float(_loss(logits, y, task)), "mAP": mean_average_precision(logits, y)}
    n_cls = logits.shape[1]
    return {"loss": float(_loss(logits, F.one_hot(y, n_cls).float(), task)), "top1": top1_accuracy(logits, y)}


def _check_split(name: str, a: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> None:
    if a.ndim != 3 or a.shape != v.shape:
        raise ValueError(f"{name}: audio {tuple(a.shape)} and video {tuple(v.shape)} features must be [N, T, D]")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: empty feature set")
    if y.shape[0] != a.shape[0]:
        raise ValueError(f"{name}: {y.shape[0]} targets for {a.shape[0]} videos")
    for m, x in (("audio", a), ("video", v)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: {m} features contain NaN/Inf")


def train_probe(train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                val: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_classes: int,
                settings: ProbeSettings = ProbeSettings(), device: torch.device | str | None = None,
                log: Callable[[dict], None] | None = None) -> ProbeResult:
    """Train an :class:`AttentionProbe` on precomputed features; evaluate on ``val`` every epoch.

    train, val: (a [N, T, D], v [N, T, D], y) with y [N] long (multiclass) or [N, C] float
    (multilabel). Returns the probe and per-epoch ``{"epoch", "lr", "train_loss", "val_loss",
    "top1" | "mAP"}``; ``log`` is called with each epoch's dict.
    """
    s = settings.validate()
    _check_split("train", *train)
    _check_split("val", *val)
    # The probe init and the mixup Beta draws use the global RNG: fork it so a seeded run is
    # reproducible without changing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return _train(train, val, num_classes, s, device, log)


def _train(train, val, num_classes: int, s: ProbeSettings, device, log) -> ProbeResult:
    a, v, y = train
    n, t, d = a.shape
    device = torch.device(device) if device is not None else a.device
    gen = torch.Generator().manual_seed(s.seed)
    model = AttentionProbe(d, num_classes, t, s.modality, s.depth, s.num_heads).to(device)
    model.set_input_stats(a.to(device), v.to(device))
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(n / s.batch_size)
    total = s.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(round(s.warmup_epochs * steps_per_epoch)), s.min_lr_ratio))
    a, v = a.to(device), v.to(device)
    y = (F.one_hot(y, num_classes).float() if s.task == "multiclass" else y.float()).to(device)
    metric = "mAP" if s.task == "multilabel" else "top1"
    result = ProbeResult(model, settings=asdict(s), metric=metric)
    beta = torch.distributions.Beta(torch.tensor(s.mixup_beta), torch.tensor(s.mixup_beta))
    for epoch in range(s.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, n, s.batch_size):
            idx = perm[i:i + s.batch_size]
            xa, xv, yt = a[idx], v[idx], y[idx]
            if s.mixup > 0:
                b = len(idx)
                lam = beta.sample((b,)).to(device)
                lam = torch.where(torch.rand(b, generator=gen).to(device) < s.mixup, lam, torch.ones_like(lam))
                partner = torch.randperm(b, generator=gen).to(device)
                lx = lam.view(b, 1, 1)
                xa = lx * xa + (1 - lx) * xa[partner]
                xv = lx * xv + (1 - lx) * xv[partner]
                yt = lam.view(b, 1) * yt + (1 - lam.view(b, 1)) * yt[partner]
            loss = _loss(model(xa, xv), yt, s.task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)     # stays on device: no per-step host sync
        ev = evaluate_probe(model, *val, task=s.task)
        rec = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": float(loss_sum) / n,
               "val_loss": ev["loss"], metric: ev[metric]}
        result.history.append(rec)
        if log is not None:
            log(rec)
    return result
