"""Attention probe on frozen per-frame features (paper §4.2, supplement §1.4 and Table 1).

Settings: the ``probe`` config section (:class:`tgdp.configs.ProbeConfig`; Table 1 columns in
:data:`tgdp.configs.PROBE_TASKS`). Heads and the features they read: :mod:`tgdp.eval.probe_heads`,
:mod:`tgdp.eval.probe_features`. Tasks: ``multilabel`` (AudioSet: BCE, metric mAP) and
``multiclass`` (VGGSound: CE, metric top-1).

Training follows the CAV-MAE fine-tuning code the supplement points to: Adam (betas 0.95, 0.999,
weight decay 5e-7 added to the gradient), per-step linear warmup then cosine (Table 1); class-balanced
sampling (sample weight = sum over its labels of 1000 / (class count + 0.01), drawn with replacement,
n per epoch); label smoothing ``ls`` (target ``ls/C`` off the labels, ``1 - ls`` on them); mixup:
with probability ``mixup`` a sample is mixed with a uniformly drawn training sample, ``lam ~
Beta(10, 10)``, target ``ls/C + lam (1 - ls) y1 + (1 - lam)(1 - ls) y2``; weight averaging: the mean
of the weights at the end of epochs ``wa_start..wa_end``. Differences, both forced by probing
precomputed features once: mixup mixes the frozen features, not the input audio and frames, and
there is no random time shift of the audio.

The reported figure (``ProbeResult.result``) is never a maximum over the evaluation split:
``probe.select = final`` reports the final model (the weight average when ``probe.wa``);
``select = val`` carves ``val_frac`` of the TRAINING clips (stratified), trains on the rest and
reports the candidate (each epoch's weights, and the average) best on that carved split. The
per-epoch evaluation-split metrics in the history are curves, not a selection.

mAP: mean over classes of average precision; a class with no positive in the evaluated set is
excluded (its AP is undefined), and a set with no positive at all raises ValueError. AP uses the
step (threshold) definition of scikit-learn: tied scores form one threshold, AP = sum over
thresholds of (recall increase) x (precision at the threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tgdp.configs import ProbeConfig
from tgdp.eval.probe_heads import OfficialProbeHead, TokenProbeHead, build_head

__all__ = ["ProbeConfig", "OfficialProbeHead", "TokenProbeHead", "ProbeResult", "average_precision",
           "mean_average_precision", "top1_accuracy", "encode_labels", "stratified_split",
           "soft_targets", "class_balanced_weights", "train_probe", "evaluate_probe"]


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
    """``result``: the reported figure (``metric`` on the evaluation split of the ``chosen`` model);
    ``model`` holds the chosen weights; ``history``: one dict per epoch."""

    model: nn.Module
    metric: str
    result: float
    chosen: str
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    num_train: int = 0
    num_select: int = 0


def _lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    return f


def soft_targets(y: torch.Tensor, smooth: float, partner: torch.Tensor | None = None,
                 lam: torch.Tensor | None = None, mixed: torch.Tensor | None = None) -> torch.Tensor:
    """Training targets from multi-hot ``y`` [B, C] as the CAV-MAE loader builds them: plain rows get
    ``1 - smooth`` on the labels and ``smooth / C`` elsewhere; rows with ``mixed`` [B] set, mixed with
    multi-hot ``partner`` [B, C] at ``lam`` [B], get ``smooth / C + (1 - smooth)(lam y + (1 - lam) partner)``."""
    c = y.shape[1]
    plain = torch.where(y > 0, torch.full_like(y, 1.0 - smooth), torch.full_like(y, smooth / c))
    if partner is None:
        return plain
    mix = smooth / c + (1 - smooth) * (lam[:, None] * y + (1 - lam[:, None]) * partner)
    return torch.where(mixed[:, None], mix, plain)


def class_balanced_weights(y: torch.Tensor) -> torch.Tensor:
    """Sampling weight per sample [N] from multi-hot ``y`` [N, C]: the sum over the sample's labels
    of ``1000 / (class count + 0.01)`` (CAV-MAE ``gen_weight_file.py``)."""
    count = y.sum(0)
    return (y * (1000.0 / (count + 0.01))).sum(1)


def _loss(logits: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()   # CE with soft targets


@torch.no_grad()
def evaluate_probe(model: nn.Module, a: torch.Tensor, v: torch.Tensor, y: torch.Tensor, task: str,
                   batch_size: int = 256) -> dict:
    """{"loss", "mAP" or "top1"} on a feature set (a, v [N, T, D]; y as from encode_labels)."""
    model.eval()
    dev = next(model.parameters()).device
    logits = torch.cat([model(a[i:i + batch_size].to(dev), v[i:i + batch_size].to(dev)).float()
                        for i in range(0, len(a), batch_size)])
    y = y.to(dev)
    if task == "multilabel":
        return {"loss": float(_loss(logits, y.float(), task)), "mAP": mean_average_precision(logits, y)}
    return {"loss": float(_loss(logits, F.one_hot(y, logits.shape[1]).float(), task)),
            "top1": top1_accuracy(logits, y)}


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


def _carve(train, cfg: ProbeConfig):
    """(train rest, selection split) of the training features, stratified by the first label."""
    a, v, y = train
    firsts = y.tolist() if cfg.task == "multiclass" else y.float().argmax(1).tolist()
    tr, sel = stratified_split([[str(c)] for c in firsts], cfg.val_frac, cfg.seed)
    return (a[tr], v[tr], y[tr]), (a[sel], v[sel], y[sel])


def train_probe(train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                evaluation: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_classes: int,
                cfg: ProbeConfig = ProbeConfig(), device: torch.device | str | None = None,
                log: Callable[[dict], None] | None = None) -> ProbeResult:
    """Train the ``cfg.head`` probe on precomputed features and report its figure on ``evaluation``.

    train, evaluation: (a [N, T, D], v [N, T, D], y) with y [N] long (multiclass) or [N, C] float
    (multilabel). ``log`` is called with each epoch's history dict. See the module docstring for
    what ``result`` is.
    """
    cfg.validate()
    _check_split("train", *train)
    _check_split("evaluation", *evaluation)
    select = None
    if cfg.select == "val":
        train, select = _carve(train, cfg)
    # The head init and the mixup Beta draws use the global RNG: fork it so a seeded run is
    # reproducible without changing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _train(train, evaluation, select, num_classes, cfg, device, log)


def _train(train, evaluation, select, num_classes: int, cfg: ProbeConfig, device, log) -> ProbeResult:
    a, v, y = train
    n, t, d = a.shape
    device = torch.device(device) if device is not None else a.device
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_head(cfg.head, d, num_classes, t, cfg.modality, cfg.depth, cfg.num_heads).to(device)
    a, v = a.to(device), v.to(device)
    if isinstance(model, TokenProbeHead):
        model.set_input_stats(a, v)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    opt = opt_cls(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    steps = math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.epochs * steps, int(round(cfg.warmup_epochs * steps)), cfg.min_lr_ratio))
    hot = (F.one_hot(y, num_classes).float() if cfg.task == "multiclass" else y.float()).to(device)
    weights = class_balanced_weights(hot).cpu() if cfg.class_balanced else None
    metric = "mAP" if cfg.task == "multilabel" else "top1"
    beta = torch.distributions.Beta(torch.tensor(cfg.mixup_beta), torch.tensor(cfg.mixup_beta))
    wa_end = cfg.wa_end or cfg.epochs
    wa_sum, best, history = None, None, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = (torch.multinomial(weights, n, replacement=True, generator=gen) if weights is not None
                 else torch.randperm(n, generator=gen)).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xa, xv, target = _batch(a, v, hot, idx, cfg, gen, beta)
            loss = _loss(model(xa, xv), target, cfg.task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)     # stays on device: no per-step host sync
        if cfg.wa and cfg.wa_start <= epoch <= wa_end:
            sd = model.state_dict()
            wa_sum = ({k: x.detach().double() for k, x in sd.items()} if wa_sum is None
                      else {k: wa_sum[k] + sd[k].double() for k in wa_sum})
        rec = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": float(loss_sum) / n,
               f"eval_{metric}": evaluate_probe(model, *evaluation, task=cfg.task)[metric]}
        if select is not None:
            rec[f"select_{metric}"] = evaluate_probe(model, *select, task=cfg.task)[metric]
            if best is None or rec[f"select_{metric}"] > best[0]:
                best = (rec[f"select_{metric}"], f"epoch {epoch}", _copy_state(model))
        history.append(rec)
        if log is not None:
            log(rec)
    chosen = f"epoch {cfg.epochs} (final)"
    if wa_sum is not None:
        count = wa_end - cfg.wa_start + 1
        ref = model.state_dict()
        model.load_state_dict({k: (x / count).to(ref[k].dtype) for k, x in wa_sum.items()})
        chosen = f"weight average of epochs {cfg.wa_start}-{wa_end}"
    if select is not None:
        # the final / averaged model competes with the best epoch on the carved split (ties: final)
        if evaluate_probe(model, *select, task=cfg.task)[metric] < best[0]:
            model.load_state_dict(best[2])
            chosen = best[1]
        chosen += f", selected on {len(select[0])} carved training clips"
    result = evaluate_probe(model, *evaluation, task=cfg.task)[metric]
    return ProbeResult(model, metric, result, chosen, history, asdict(cfg), num_train=n,
                       num_select=0 if select is None else len(select[0]))


def _batch(a: torch.Tensor, v: torch.Tensor, hot: torch.Tensor, idx: torch.Tensor, cfg: ProbeConfig,
           gen: torch.Generator, beta: torch.distributions.Beta):
    """Features [b, T, D] x 2 and soft targets [b, C] of the rows ``idx``, with mixup: each row is
    mixed, with probability ``cfg.mixup``, with a uniformly drawn training row at ``lam ~ Beta``."""
    xa, xv = a[idx], v[idx]
    if cfg.mixup == 0:
        return xa, xv, soft_targets(hot[idx], cfg.label_smooth)
    b, dev = len(idx), a.device
    mix = torch.rand(b, generator=gen).to(dev) < cfg.mixup
    lam = torch.where(mix, beta.sample((b,)).to(dev), torch.ones(b, device=dev))
    partner = torch.randint(0, len(a), (b,), generator=gen).to(dev)
    lx = lam.view(b, 1, 1)
    return (lx * xa + (1 - lx) * a[partner], lx * xv + (1 - lx) * v[partner],
            soft_targets(hot[idx], cfg.label_smooth, hot[partner], lam, mix))


def _copy_state(model: nn.Module) -> dict:
    return {k: x.detach().clone() for k, x in model.state_dict().items()}
