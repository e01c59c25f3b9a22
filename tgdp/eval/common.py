"""Shared evaluation plumbing: checkpoint -> frozen encoder, retrieval loader, feature extraction.

Checkpoints are dicts with at least ``"model"`` (the student state dict, official parameter names)
and ``"config"`` (:func:`tgdp.configs.to_dict`). The model is rebuilt from the saved config and
the state dict must match it exactly: a missing or unexpected key or a shape that disagrees with
the config raises ``CheckpointError``, a ``ValueError`` (the official loader's ``strict=False``
silently evaluates random weights, spec §9.16).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from tgdp.configs import Config, from_dict

__all__ = ["VideoFeatures", "build_model", "load_checkpoint",
           "make_retrieval_loader", "extract_video_features", "coverage"]


@dataclass
class VideoFeatures:
    """Per-frame global embeddings of N videos (host, fp32).

    a, v: [N, T, D] (norm_a / norm_v CLS outputs, not L2-normalised); ids: N str; labels: N lists.
    coverage: how many videos of the data were evaluated and why others were not
    (:func:`extract_video_features` sets it when the loader knows its manifest), else None.
    """

    a: torch.Tensor
    v: torch.Tensor
    ids: list[str]
    labels: list[list[str]]
    coverage: dict | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Atomic save of the features (a plain dict of tensors and lists, read back weights-only)."""
        from tgdp.training.checkpoint import write_checkpoint

        write_checkpoint({"a": self.a, "v": self.v, "ids": self.ids, "labels": self.labels}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VideoFeatures":
        from tgdp.training.checkpoint import CheckpointError, read_checkpoint

        d = read_checkpoint(path)
        missing = {"a", "v", "ids", "labels"} - set(d) if isinstance(d, dict) else {"a", "v", "ids", "labels"}
        if missing:
            raise CheckpointError(f"feature file {path} lacks {sorted(missing)}; write it with "
                                  "python -m tgdp.eval retrieval --save-features")
        return cls(d["a"], d["v"], list(d["ids"]), [list(x) for x in d["labels"]])


def build_model(cfg: Config) -> nn.Module:
    """The encoder for ``cfg.model``, chosen by ``train.model_impl`` as training does."""
    from tgdp.model import build_encoder

    return build_encoder(cfg.model, cfg.train.model_impl)


def _check_state_dict(model: nn.Module, sd: dict, path: Any, cfg: Config) -> None:
    """ValueError listing missing / unexpected keys and shape mismatches vs the config's model."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        m = cfg.model
        parts = [f"checkpoint {path} does not match its config (model.embed_dim={m.embed_dim}, "
                 f"model.depth={m.depth}, model.img_size={m.img_size}, "
                 f"model.num_register_tokens={m.num_register_tokens})"]
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]} "
                         "(official checkpoints: convert them with `python -m tgdp.convert`)")
        from tgdp.training.checkpoint import CheckpointError

        raise CheckpointError("; ".join(parts))


def load_checkpoint(path: str | os.PathLike, overrides: dict | None = None,
                    model_factory: Callable[[Config], nn.Module] | None = None,
                    device: torch.device | str | None = None, weights: str = "model"
                    ) -> tuple[nn.Module, Config]:
    """Rebuild the frozen encoder of a training checkpoint.

    Returns (model in eval mode with requires_grad off, on ``device``; the checkpoint's config
    with ``overrides`` (dotted, e.g. ``{"data.root": ...}``) applied). Model geometry always comes
    from the checkpoint. ``model_factory`` (default :func:`build_model`) builds the model from
    the config. ``weights``: which state dict to load, "model" (the student) or "teacher" (EMA).
    """
    from tgdp.configs import apply_overrides

    from tgdp.cli import fold
    from tgdp.training.checkpoint import CheckpointError, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint file")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        keys = fold(sorted(map(str, ckpt))) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} must be a dict with 'model' and 'config'; got {keys} "
                              "(official weights: convert them with python -m tgdp.convert import)")
    cfg = from_dict(ckpt["config"]).validate()
    if overrides:
        cfg = apply_overrides(cfg, overrides).validate()
    if weights not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no {weights!r} weights; it has {fold(sorted(ckpt))}")
    model = (model_factory or build_model)(cfg)
    sd = ckpt[weights]
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"checkpoint {path}: {weights!r} must be a non-empty state dict")
    _check_state_dict(model, sd, path, cfg)
    model.load_state_dict(sd, strict=True)
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return model, cfg


def make_retrieval_loader(cfg: Config, data_root: str | None = None,
                          device: torch.device | None = None) -> Iterable:
    """The data loader in retrieval mode (all frames per video, video-major, no shuffling).

    ``data_root`` overrides ``data.root`` ("" / None: the config's root, else the demo set's val split).
    """
    from tgdp.data.loader import make_loader

    if data_root:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    # Pass the optional knobs only where the loader takes them (its signature is owned elsewhere).
    wanted = {"batch_size": cfg.eval.batch_videos, "root": data_root or None, "device": device,
              "shuffle": False, "drop_last": False}
    params = inspect.signature(make_loader).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params and v is not None}
    return make_loader(cfg, mode="retrieval", **kwargs)


def _per_video(name: str, items: list, b: int, t: int) -> list:
    """Per-row (B*T entries, repeated per video) or per-video (B entries) metadata -> B entries."""
    if len(items) == b * t:
        per = [items[i * t] for i in range(b)]
        for i in range(b):
            if any(x != items[i * t] for x in items[i * t:(i + 1) * t]):
                raise ValueError(f"retrieval batch rows {i * t}..{(i + 1) * t - 1} must be the {t} frames "
                                 f"of one video, but their {name} differ")
        return per
    if len(items) == b:
        return list(items)
    raise ValueError(f"retrieval batch has {len(items)} {name} for {b * t} rows ({t} frames per video)")


@torch.no_grad()
def extract_video_features(model: nn.Module, loader: Iterable, frames_per_clip: int,
                           max_videos: int | None = None,
                           device: torch.device | str | None = None) -> VideoFeatures:
    """Run ``model.extract_features`` over a retrieval loader.

    Each batch holds ``B`` videos: audio [B*T, T_a, n_mels], frames [B*T, 3, S, S] (video-major:
    rows b*T .. b*T+T-1 are the T frames of video b), ids and labels per row (B*T, repeated within a
    video, as :class:`tgdp.data.Batch`) or per video (B); frame_idx [B*T] (checked when on the
    host). Features stay on the
    device until the loop ends and move to the host once. bf16 autocast on CUDA only.
    Returns at most ``max_videos`` videos; raises ValueError on empty data, a batch whose row
    count is not B*T, or non-finite features.
    """
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    model.eval()
    t = frames_per_clip
    feats_a: list[torch.Tensor] = []
    feats_v: list[torch.Tensor] = []
    ids: list[str] = []
    labels: list[list[str]] = []
    for batch in loader:
        rows = batch.audio.shape[0]
        if rows % t or batch.frames.shape[0] != rows or rows == 0:
            raise ValueError(f"retrieval batch must hold {t} frames per video, video-major: audio "
                             f"{tuple(batch.audio.shape)}, frames {tuple(batch.frames.shape)}")
        b = rows // t
        batch_ids = _per_video("ids", [str(i) for i in batch.ids], b, t)
        batch_labels = _per_video("labels", [list(x) for x in batch.labels], b, t)
        fidx = getattr(batch, "frame_idx", None)
        if isinstance(fidx, torch.Tensor) and fidx.device.type == "cpu" and fidx.numel() == rows:
            # Host-side check only (a device tensor would cost a sync per batch).
            if not torch.equal(fidx.view(b, t), torch.arange(t).expand(b, t).to(fidx.dtype)):
                raise ValueError(f"retrieval batch frame_idx must be 0..{t - 1} per video, video-major")
        audio = batch.audio.to(device, non_blocking=True)
        frames = batch.frames.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cls_a, cls_v = model.extract_features(audio, frames)
        feats_a.append(cls_a.float().reshape(b, t, -1))
        feats_v.append(cls_v.float().reshape(b, t, -1))
        ids.extend(batch_ids)
        labels.extend(batch_labels)
        if max_videos is not None and len(ids) >= max_videos:
            break
    if not ids:
        from tgdp.cli import DataError

        raise DataError("empty data: the loader yielded no videos (every sample missing or skipped as "
                        "corrupt); check the shard folder and its skipped.json")
    dup = len(ids) - len(set(ids))
    if dup:
        # Duplicated ids are legal (the official metric keeps them) but usually a data mistake.
        print(f"warning: {dup} duplicated video ids in the retrieval data")
    n = len(ids) if max_videos is None else min(len(ids), max_videos)
    cov = coverage(loader, n, max_videos)
    if cov is not None:
        print(cov["line"])
    a = torch.cat(feats_a)[:n].cpu()   # the single device->host transfer
    v = torch.cat(feats_v)[:n].cpu()
    for name, x in (("audio", a), ("video", v)):
        bad = ~torch.isfinite(x).reshape(n, -1).all(dim=1)
        if bool(bad.any()):
            first = [ids[i] for i in bad.nonzero().flatten()[:5].tolist()]
            raise ValueError(f"model produced NaN/Inf {name} features for {int(bad.sum())} of {n} "
                             f"videos (first ids {first})")
    return VideoFeatures(a, v, ids[:n], labels[:n], cov)


def coverage(loader, evaluated: int, limit: int | None = None) -> dict | None:
    """``{"evaluated", "in_manifest", "skipped": {reason: n}, "limit", "line"}`` for a loader that
    knows its manifest (both tgdp loaders), else None. ``line``: "N evaluated of M in the manifest
    (root); skipped: ..." for the report."""
    man = getattr(loader, "manifest", None)
    if not isinstance(man, dict):
        return None
    m = int(man.get("num_samples", 0))
    skipped = {k: int(v) for k, v in sorted(dict(getattr(loader, "skipped", {}) or {}).items()) if v}
    why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    line = f"{evaluated} evaluated of {m} in the manifest ({getattr(loader, 'root', '?')}); skipped: {why}"
    if limit is not None and evaluated >= limit and evaluated < m:
        line += f"; stopped at eval.retrieval_videos={limit}"
    return {"evaluated": evaluated, "in_manifest": m, "skipped": skipped, "limit": limit, "line": line}
