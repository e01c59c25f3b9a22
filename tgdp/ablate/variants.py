"""Named ablation variants: each is a set of dotted config overrides applied on top of the preset.

Built in (:data:`BUILTIN`), after the TG-DP paper's comparisons (Table 1: TG-DP vs the CAV-MAE
Sync baseline; Tables 5–8: dual path, guided vs random contrastive masks, distillation):

========================  ===================================================================
``baseline``              CAV-MAE Sync single pass: one view at ``masking.rec_ratio``, contrastive
                          loss on its CLS, no teacher, no distillation
``dual_random``           dual path, random contrastive masks, no teacher, no distillation
``tgdp``                  TG-DP: teacher-guided distinct top-k contrastive masks + distillation
``tgdp_gumbel``           TG-DP with Gumbel top-k sampling of the guided masks
``tgdp_no_distill``       TG-DP without the distillation loss (the teacher only guides the masks)
``official_compat``       TG-DP with the released code's behaviour: the teacher ranks a shuffled
                          sequence (``masking.official_compat``)
========================  ===================================================================

Users add their own in a TOML file (``--variants-file``)::

    [variants.tgdp_con75]
    description = "TG-DP with a 75 % contrastive mask"
    base = "tgdp"                 # optional: start from a built-in (or earlier) variant's overrides
    masking.con_ratio = 0.75      # any dotted config field

Equal compute: a variant may not change what the comparison holds fixed — steps, batch, seed,
data, evaluation, output folder (:data:`FIXED`); those are set once for the whole study.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgdp.cli import UserError
from tgdp.configs import Config, ConfigError, apply_overrides

__all__ = ["Variant", "BUILTIN", "FIXED", "check_overrides", "load_variants", "resolve", "format_overrides"]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    description: str = ""
    source: str = "built-in"


def _v(name: str, description: str, **overrides: Any) -> Variant:
    return Variant(name, {k.replace("__", "."): v for k, v in overrides.items()}, description)


BUILTIN: dict[str, Variant] = {v.name: v for v in (
    _v("baseline", "CAV-MAE Sync single pass: one view at the reconstruction ratio, contrastive loss on "
       "its CLS, no teacher, no distillation", masking__dual_path=False, loss__w_dis=0.0),
    _v("dual_random", "dual path, random contrastive masks, no teacher, no distillation",
       masking__guide="random", loss__w_dis=0.0),
    _v("tgdp", "TG-DP: teacher-guided distinct top-k contrastive masks + distillation", masking__guide="distinct"),
    _v("tgdp_gumbel", "TG-DP with Gumbel top-k sampling of the guided masks", masking__guide="gumbel"),
    _v("tgdp_no_distill", "TG-DP without distillation (the teacher only guides the masks)",
       masking__guide="distinct", loss__w_dis=0.0),
    _v("official_compat", "TG-DP as released: the teacher ranks a shuffled sequence",
       masking__guide="distinct", masking__official_compat=True),
)}

# Held equal across the variants of one study (set by the ablation command itself).
FIXED = ("train.steps", "train.epochs", "train.batch_size", "train.seed", "train.out_dir", "train.resume",
         "train.init", "data.root", "data.demo_dir", "eval.")


def check_overrides(name: str, overrides: dict[str, Any], where: str) -> None:
    """UserError if a variant touches a field the comparison holds fixed."""
    for key in overrides:
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED):
            raise UserError(f"variant {name!r} overrides {key}, which every variant shares (equal compute: "
                            f"steps, batch, seed, data and evaluation are set once for the study), in {where}; "
                            "remove it from the variant, or set it for all runs on the command line")


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_variants(path: str | Path | None) -> dict[str, Variant]:
    """The built-in variants plus those of a TOML file (``[variants.<name>]`` tables)."""
    out = dict(BUILTIN)
    if path is None:
        return out
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"variants file {path} is not valid TOML ({exc}); fix the file") from None
    tables = data.get("variants")
    extra = sorted(set(data) - {"variants"})
    if not isinstance(tables, dict) or not tables or extra:
        raise UserError(f"variants file {path} must hold only [variants.<name>] tables"
                        + (f" (found top-level {extra})" if extra else "") + "; see the README, 'Ablations'")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"variants file {path}: variants.{name} must be a table of config overrides")
        table = dict(table)
        description = str(table.pop("description", ""))
        base = table.pop("base", None)
        overrides: dict[str, Any] = {}
        if base is not None:
            if base not in out:
                raise UserError(f"variants file {path}: variants.{name}.base={base!r} is not a known variant; "
                                f"choose one of {sorted(out)}")
            overrides.update(out[base].overrides)
        own = dict(_flatten(table))
        check_overrides(name, own, str(path))
        overrides.update(own)
        out[name] = Variant(name, overrides, description or (f"{base} + {format_overrides(own)}" if base else ""),
                            source=str(path))
    return out


def resolve(cfg: Config, variant: Variant) -> Config:
    """``cfg`` with the variant's overrides, validated (ConfigError names the field and the variant)."""
    try:
        return apply_overrides(cfg, variant.overrides).validate()
    except ConfigError as exc:
        raise ConfigError(f"variant {variant.name!r} ({variant.source}): {exc}") from None


def format_overrides(overrides: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in overrides.items()) or "(none: the preset)"
