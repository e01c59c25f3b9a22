"""Official CAV-MAE Sync / TG-DP checkpoints <-> tgdp models (spec §8.1).

Our models use the official parameter names without the DataParallel/DDP ``module.`` prefix, so
import is: read (``torch.load(weights_only=True)``), unwrap ``{"model": ...}`` / ``{"state_dict": ...}``,
strip ``module.``, drop the ``constrative_head_*`` blocks (the evaluated config has no contrastive
heads, and neither do we), check the geometry (register rows = 2R, pos-table shapes), and load
strictly: missing, unexpected and mis-shaped keys are all listed in the error. The four sin-cos
tables are loaded from the checkpoint (we report how far they are from our recomputed ones).

CLI::

    python -m tgdp.convert import official.pth ours.pt [--preset paper] [--config f.toml] [--select PREFIX]
    python -m tgdp.convert export ours.pt official.pth [--preset paper] [--no-module]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tgdp.atomic import atomic_torch_save
from tgdp.configs import ModelConfig

__all__ = ["ConvertReport", "read_state_dict", "from_official", "load_official", "to_official", "main"]

_POS_TABLES = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")
_HEAD_PREFIX = "constrative_head_"  # sic: the official spelling


@dataclass
class ConvertReport:
    dropped: list[str] = field(default_factory=list)      # contrastive-head keys we have no use for
    missing: list[str] = field(default_factory=list)      # only non-empty when strict=False
    unexpected: list[str] = field(default_factory=list)
    pos_max_diff: dict[str, float] = field(default_factory=dict)  # checkpoint table vs recomputed


def read_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """A file (loaded with ``weights_only=True`` on CPU) or a dict; nested ``model``/``state_dict`` unwrapped."""
    obj: Any = src
    if isinstance(src, (str, os.PathLike)):
        obj = torch.load(src, map_location="cpu", weights_only=True)
    for _ in range(4):  # a few levels of {"model": {"state_dict": ...}} at most
        if not isinstance(obj, Mapping):
            raise ValueError(f"checkpoint is a {type(obj).__name__}, expected a state dict (a mapping)")
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"checkpoint holds no tensors at the top level and no 'model'/'state_dict' "
                             f"entry; keys: {sorted(obj)[:20]}")
        obj = inner
    raise ValueError("checkpoint nests 'model'/'state_dict' more than 4 levels deep")


def _expected(target: nn.Module | ModelConfig) -> dict[str, torch.Size]:
    if isinstance(target, ModelConfig):
        from tgdp.reference.model import CAVMAESync  # lazy: meta build only for the key/shape list
        target = CAVMAESync(target, device="meta")
    return {k: v.shape for k, v in target.state_dict().items()}


def from_official(src: str | os.PathLike | Mapping[str, Any], target: nn.Module | ModelConfig,
                  *, strict: bool = True, select: str = "") -> tuple[dict[str, Tensor], ConvertReport]:
    """Official layout -> our key names, checked against ``target`` (a model or its config).

    ``select``: keep only keys under this prefix (after ``module.`` stripping) and strip it, e.g.
    ``"student."`` / ``"teacher.module."`` for a tgdp ``TGDP`` checkpoint.
    """
    sd = read_state_dict(src)
    rep = ConvertReport()
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if select:
            if not k.startswith(select):
                continue
            k = k[len(select):]
        if k.startswith(_HEAD_PREFIX):
            rep.dropped.append(k)
            continue
        out[k] = v
    exp = _expected(target)
    cfg = target if isinstance(target, ModelConfig) else getattr(target, "cfg", None)
    if cfg is not None:
        _check_geometry(out, cfg)
    missing = sorted(set(exp) - set(out))
    unexpected = sorted(set(out) - set(exp))
    bad_shape = sorted(f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(exp[k])}"
                       for k in set(out) & set(exp) if out[k].shape != exp[k])
    if bad_shape:
        raise ValueError("shape mismatch for " + "; ".join(bad_shape))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    rep.missing, rep.unexpected = missing, unexpected
    for k in unexpected:
        out.pop(k)
    if cfg is not None:
        from tgdp.reference.pos_embed import sincos_2d
        (fa, ta), (hv, wv) = cfg.audio_grid, cfg.video_grid
        geo = {"pos_embed_a": (cfg.embed_dim, fa, ta), "pos_embed_v": (cfg.embed_dim, hv, wv),
               "decoder_pos_embed_a": (cfg.decoder_embed_dim, fa, ta),
               "decoder_pos_embed_v": (cfg.decoder_embed_dim, hv, wv)}
        for k, (d, h, w) in geo.items():
            if k in out:
                ref = torch.from_numpy(sincos_2d(d, h, w)).unsqueeze(0)
                rep.pos_max_diff[k] = float((out[k].float().cpu() - ref).abs().max())
    return out, rep


def _check_geometry(sd: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    r = cfg.num_register_tokens
    if "register_tokens" in sd and sd["register_tokens"].shape[0] != 2 * r:
        raise ValueError(f"register_tokens has {sd['register_tokens'].shape[0]} rows, expected 2R = {2 * r} "
                         f"(model.num_register_tokens={r})")
    want = {"pos_embed_a": (1, cfg.num_patches_a, cfg.embed_dim),
            "pos_embed_v": (1, cfg.num_patches_v, cfg.embed_dim),
            "decoder_pos_embed_a": (1, cfg.num_patches_a, cfg.decoder_embed_dim),
            "decoder_pos_embed_v": (1, cfg.num_patches_v, cfg.decoder_embed_dim)}
    for k, shape in want.items():
        if k in sd and tuple(sd[k].shape) != shape:
            hint = " (audio tokens = audio_length/16 * n_mels/16: 208 for 416 frames, 512 for 1024)" \
                if k.endswith("_a") else ""
            raise ValueError(f"{k} shape {tuple(sd[k].shape)} != expected {shape} for this config{hint}")


def load_official(model: nn.Module, src: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
                  select: str = "") -> ConvertReport:
    """Read an official (or tgdp) state dict into ``model`` in place; strict by default."""
    sd, rep = from_official(src, model, strict=strict, select=select)
    model.load_state_dict(sd, strict=strict)
    return rep


def to_official(src: nn.Module | Mapping[str, Tensor], *, module_prefix: bool = True) -> dict[str, Tensor]:
    """Our state dict -> the official layout (optionally with the ``module.`` prefix of DP/DDP checkpoints)."""
    sd = src.state_dict() if isinstance(src, nn.Module) else read_state_dict(src)
    pre = "module." if module_prefix else ""
    return {pre + k: v.detach().clone() for k, v in sd.items()}


def main(argv: list[str] | None = None) -> int:
    from tgdp.configs import load
    from tgdp.reference.model import CAVMAESync

    ap = argparse.ArgumentParser(prog="python -m tgdp.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("direction", choices=["import", "export"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--config", default=None, help="TOML file applied on the preset")
    ap.add_argument("--select", default="", help="import only keys under this prefix (e.g. 'student.')")
    ap.add_argument("--no-strict", action="store_true", help="import: allow missing/unexpected keys")
    ap.add_argument("--no-module", action="store_true", help="export: no 'module.' prefix")
    args, overrides = ap.parse_known_args(argv)
    cfg = load(args.preset, args.config, overrides or None)
    model = CAVMAESync(cfg.model, device="meta")
    if args.direction == "import":
        sd, rep = from_official(args.src, model, strict=not args.no_strict, select=args.select)
        model.load_state_dict(sd, strict=not args.no_strict, assign=True)  # proves the dict fits
        atomic_torch_save(sd, args.dst)
        print(f"imported {len(sd)} tensors -> {args.dst}; dropped {len(rep.dropped)} contrastive-head keys "
              "(no heads in this model)")
        if rep.missing or rep.unexpected:
            print(f"missing keys: {rep.missing}\nunexpected keys (ignored): {rep.unexpected}")
        for k, d in rep.pos_max_diff.items():
            print(f"{k}: max |checkpoint - recomputed| = {d:.2e}")
    else:
        sd, _ = from_official(args.src, model, strict=True)
        atomic_torch_save(to_official(sd, module_prefix=not args.no_module), args.dst)
        print(f"exported {len(sd)} tensors -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
