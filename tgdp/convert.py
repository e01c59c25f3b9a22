"""Official CAV-MAE Sync / TG-DP checkpoints <-> tgdp checkpoints (spec §8.1).

    python -m tgdp.convert import official.pth ours.pt [--preset paper] [--config f.toml] [--select PREFIX]
    python -m tgdp.convert export ours.pt official.pth [--weights model|teacher] [--no-module]

import writes a tgdp checkpoint -- model (the weights), config (the geometry they were checked
against) and provenance (source file, its SHA-256, what was dropped) -- that python -m tgdp.eval
retrieval|probe and --train.init accept. export reads the config from the checkpoint (a training
checkpoint or an imported one) and writes the official layout; official -> tgdp -> official gives
back the same tensors bit for bit (the unused contrastive heads travel in the tgdp checkpoint).

Our models use the official parameter names without the DataParallel/DDP ``module.`` prefix, so
import is: read (weights only, through tgdp.training.checkpoint.read_checkpoint), unwrap
``{"model": ...}`` / ``{"state_dict": ...}``, strip ``module.``, set aside the ``constrative_head_*``
blocks (the evaluated config has no contrastive heads, and neither do we), check the geometry
(register rows = 2R, pos-table shapes), and match strictly: missing, unexpected and mis-shaped keys
are all reported (counted, first few named). The four sin-cos tables are taken from the checkpoint
(we report how far they are from our recomputed ones).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tgdp.configs import ModelConfig

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["ConvertReport", "read_state_dict", "from_official", "load_official", "to_official",
           "import_checkpoint", "export_checkpoint", "main"]

_POS_TABLES = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")
_HEAD_PREFIX = "constrative_head_"  # sic: the official spelling
_LIST = 3  # keys named in an error before "..."


def _error(msg: str) -> Exception:
    from tgdp.training.checkpoint import CheckpointError  # a ValueError the CLI reports in one line

    return CheckpointError(msg)


def _fold(keys: list[str]) -> str:
    from tgdp.cli import fold

    return fold(keys, _LIST)


@dataclass
class ConvertReport:
    dropped: list[str] = field(default_factory=list)      # contrastive-head keys we have no use for
    missing: list[str] = field(default_factory=list)      # only non-empty when strict=False
    unexpected: list[str] = field(default_factory=list)
    pos_max_diff: dict[str, float] = field(default_factory=dict)  # checkpoint table vs recomputed
    heads: dict[str, Any] = field(default_factory=dict)   # the dropped tensors, by key
    module_prefix: bool = False                           # the source's keys had ``module.``


def read_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """A file (read weights-only on CPU) or a dict; nested ``model``/``state_dict`` unwrapped."""
    from torch import Tensor

    obj: Any = src
    where = f"checkpoint {src}" if isinstance(src, (str, os.PathLike)) else "checkpoint"
    if isinstance(src, (str, os.PathLike)):
        from tgdp.training.checkpoint import read_checkpoint
        obj = read_checkpoint(src)
    for _ in range(4):  # a few levels of {"model": {"state_dict": ...}} at most
        if not isinstance(obj, Mapping):
            raise _error(f"{where} is a {type(obj).__name__}, expected a state dict (a mapping of tensors)")
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise _error(f"{where} holds no tensors at the top level and no 'model'/'state_dict' entry; "
                         f"its keys: {_fold(sorted(map(str, obj)))}")
        obj = inner
    raise _error(f"{where} nests 'model'/'state_dict' more than 4 levels deep")


def _expected(target: nn.Module | ModelConfig) -> dict[str, Any]:
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
    where = f"checkpoint {src}" if isinstance(src, (str, os.PathLike)) else "checkpoint"
    rep = ConvertReport(module_prefix=bool(sd) and all(k.startswith("module.") for k in sd))
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if select:
            if not k.startswith(select):
                continue
            k = k[len(select):]
        if k.startswith(_HEAD_PREFIX):
            rep.dropped.append(k)
            rep.heads[k] = v
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
        raise _error(f"{where} does not fit the model: {len(bad_shape)} shape mismatches, e.g. "
                     + "; ".join(bad_shape[:_LIST]) + "; pass the config it was trained with (--preset/--config)")
    if strict and (missing or unexpected):
        raise _error(f"{where} does not match the model: missing keys {_fold(missing)}, unexpected keys "
                     f"{_fold(unexpected)}; check --preset/--config (or --select for a prefixed state dict)")
    rep.missing, rep.unexpected = missing, unexpected
    for k in unexpected:
        out.pop(k)
    if cfg is not None:
        import torch

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
        raise _error(f"register_tokens has {sd['register_tokens'].shape[0]} rows, expected 2R = {2 * r} "
                     f"(model.num_register_tokens={r}); pass the config it was trained with")
    want = {"pos_embed_a": (1, cfg.num_patches_a, cfg.embed_dim),
            "pos_embed_v": (1, cfg.num_patches_v, cfg.embed_dim),
            "decoder_pos_embed_a": (1, cfg.num_patches_a, cfg.decoder_embed_dim),
            "decoder_pos_embed_v": (1, cfg.num_patches_v, cfg.decoder_embed_dim)}
    for k, shape in want.items():
        if k in sd and tuple(sd[k].shape) != shape:
            hint = " (audio tokens = audio_length/16 * n_mels/16: 208 for 416 frames, 512 for 1024)" \
                if k.endswith("_a") else ""
            raise _error(f"{k} shape {tuple(sd[k].shape)} != expected {shape} for this config{hint}")


def load_official(model: nn.Module, src: str | os.PathLike | Mapping[str, Any], *, strict: bool = True,
                  select: str = "") -> ConvertReport:
    """Read an official (or tgdp) state dict into ``model`` in place; strict by default."""
    sd, rep = from_official(src, model, strict=strict, select=select)
    model.load_state_dict(sd, strict=strict)
    return rep


def to_official(src: nn.Module | Mapping[str, Tensor], *, module_prefix: bool = True) -> dict[str, Tensor]:
    """Our state dict -> the official layout (optionally with the ``module.`` prefix of DP/DDP checkpoints)."""
    from torch import nn

    sd = src.state_dict() if isinstance(src, nn.Module) else read_state_dict(src)
    pre = "module." if module_prefix else ""
    return {pre + k: v.detach().clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------- whole checkpoints

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, cfg, *, strict: bool = True,
                      select: str = "") -> tuple[Path, ConvertReport]:
    """Official (or any tgdp-named) weights in ``src`` -> a tgdp checkpoint at ``dst`` for ``cfg``:
    ``{"model", "config", "provenance", "official_extra"}`` (the last: the set-aside contrastive
    heads, so that :func:`export_checkpoint` gives the source back)."""
    import torch

    from tgdp import __version__
    from tgdp.configs import to_dict
    from tgdp.reference.model import CAVMAESync
    from tgdp.training.checkpoint import write_checkpoint

    src = Path(src)
    model = CAVMAESync(cfg.model, device="meta")
    sd, rep = from_official(src, model, strict=strict, select=select)
    model.load_state_dict(sd, strict=strict, assign=True)  # proves the dict fits
    prov = {"tool": "python -m tgdp.convert import", "source": str(src.resolve()), "source_sha256": _sha256(src),
            "select": select, "strict": strict, "module_prefix": rep.module_prefix,
            "dropped": rep.dropped, "missing": rep.missing, "unexpected_ignored": rep.unexpected,
            "pos_max_diff": rep.pos_max_diff, "tgdp_version": __version__, "torch_version": str(torch.__version__)}
    state = {"model": sd, "config": to_dict(cfg), "provenance": prov, "official_extra": rep.heads}
    return write_checkpoint(state, dst), rep


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, cfg=None, *, weights: str = "model",
                      module_prefix: bool | None = None) -> tuple[Path, int, bool]:
    """A tgdp checkpoint (training or imported) -> the official layout at ``dst``.

    The geometry comes from the checkpoint's config (``cfg`` only for a bare state dict without one).
    ``module_prefix`` None: as the imported source had it (provenance), else True (DP/DDP style).
    Returns (path, number of tensors written, whether the checkpoint's own config was used)."""
    from tgdp.configs import from_dict
    from tgdp.training.checkpoint import read_checkpoint, write_checkpoint

    ckpt = read_checkpoint(src)
    if not isinstance(ckpt, Mapping):
        raise _error(f"checkpoint {src} is a {type(ckpt).__name__}, expected a dict")
    stored = "config" in ckpt
    if stored:
        cfg = from_dict(ckpt["config"]).validate()
    elif cfg is None:
        raise _error(f"checkpoint {src} stores no config (a bare state dict); pass --preset/--config with the "
                     "geometry it was trained with")
    if "model" in ckpt and weights not in ckpt:
        raise _error(f"checkpoint {src} has no {weights!r} weights; it has {_fold(sorted(ckpt))}")
    body = ckpt[weights] if weights in ckpt else ckpt
    sd, _ = from_official(body, cfg.model, strict=True)
    prov = ckpt.get("provenance") or {}
    if module_prefix is None:
        module_prefix = bool(prov.get("module_prefix", True))
    out = {**sd, **(ckpt.get("official_extra") or {})} if weights == "model" else sd
    return write_checkpoint(to_official(out, module_prefix=module_prefix), dst), len(out), stored


def _main(argv: list[str]) -> int:
    from tgdp.cli import parser

    doc = __doc__.split("\n\n")
    ap = parser("tgdp.convert", "\n\n".join(doc[:3]),
                epilog="Any other --section.field VALUE overrides the import config (python -m tgdp.train "
                       "--print-config lists the fields).")
    ap.add_argument("direction", choices=["import", "export"],
                    help="import: official -> tgdp checkpoint; export: tgdp checkpoint -> official layout")
    ap.add_argument("src", type=Path, help="checkpoint to read")
    ap.add_argument("dst", type=Path, help="file to write (atomically)")
    ap.add_argument("--preset", default=None,
                    help="import: config preset of the weights' geometry (default: paper); export: only for a "
                         "bare state dict without a stored config")
    ap.add_argument("--config", default=None, metavar="FILE", help="TOML file applied on the preset")
    ap.add_argument("--select", default="", metavar="PREFIX",
                    help="import: only keys under this prefix, stripped (e.g. 'student.')")
    ap.add_argument("--no-strict", action="store_true", help="import: allow missing/unexpected keys (listed)")
    ap.add_argument("--weights", choices=("model", "teacher"), default="model",
                    help="export: which weights of a training checkpoint, the student or the EMA teacher")
    ap.add_argument("--no-module", action="store_true",
                    help="export: no 'module.' key prefix (default: as the imported source had it, else with)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args, overrides = ap.parse_known_args(argv)
    from tgdp.configs import load

    if args.direction == "import":
        cfg = load(args.preset or "paper", args.config, overrides or None)
        path, rep = import_checkpoint(args.src, args.dst, cfg, strict=not args.no_strict, select=args.select)
        print(f"imported {args.src} -> {path}: tgdp checkpoint (model + config + provenance) of a "
              f"{cfg.preset} model; set aside {len(rep.dropped)} contrastive-head keys (no heads in this model, "
              "kept for export)")
        if rep.missing or rep.unexpected:
            print(f"missing keys {_fold(rep.missing)}; unexpected keys (ignored) {_fold(rep.unexpected)}")
        for k, d in rep.pos_max_diff.items():
            print(f"{k}: max |checkpoint - recomputed| = {d:.2e}")
        print(f"use it with: python -m tgdp.eval retrieval --ckpt {path} --data DIR, or "
              f"python -m tgdp.train ... --train.init {path}")
        return 0
    given = args.preset is not None or args.config is not None or overrides
    cfg = load(args.preset or "paper", args.config, overrides or None) if given else None
    path, n, stored = export_checkpoint(args.src, args.dst, cfg, weights=args.weights,
                                        module_prefix=False if args.no_module else None)
    print(f"exported {n} tensors ({args.weights}) -> {path} (official layout)")
    if stored and given:
        print("note: the geometry came from the config stored in the checkpoint; --preset/--config/overrides "
              "were not needed and were not used")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.convert``: expected errors are one line and exit status 2."""
    from tgdp.cli import run

    return run("tgdp.convert", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
