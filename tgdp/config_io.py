"""Loading, dotted overrides and (de)serialisation of :class:`tgdp.configs.Config`.

Everything here is re-exported by :mod:`tgdp.configs`; import it from there.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

from tgdp.configs import PRESETS, Config, ConfigError

__all__ = ["to_dict", "from_dict", "apply_overrides", "parse_cli_overrides", "load"]


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (JSON/TOML-safe), saved in every checkpoint and run summary."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(d: dict[str, Any], base: Config | None = None) -> Config:
    """Build a config from a nested dict on top of ``base`` (default: the dict's own preset)."""
    d = dict(d)
    preset = d.pop("preset", None)
    if base is None:
        base = _preset(preset or "paper")
    flat = dict(_flatten(d))
    if preset is not None:
        flat["preset"] = preset
    return _apply(base, flat)


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Apply dotted overrides: ``{"model.depth": 4}`` or CLI style ``["--model.depth", "4"]``.

    String values are parsed against the field's type ("4" -> int, "true" -> bool, "0.9,0.99" -> tuple).
    """
    if isinstance(overrides, list):
        overrides = parse_cli_overrides(overrides)
    return _apply(cfg, dict(overrides))


def parse_cli_overrides(argv: list[str]) -> dict[str, str]:
    """``["--model.depth", "4", "--train.compile=true"]`` -> ``{"model.depth": "4", "train.compile": "true"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise ConfigError(f"expected a dotted override like --model.depth 4, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override --{key} has no value")
            i += 1
            val = argv[i]
        out[key] = val
        i += 1
    return out


def load(preset: str = "paper", file: str | Path | None = None,
         overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Preset, then TOML file (``[model]`` tables etc.), then dotted overrides; validated."""
    if file is not None:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
        preset = data.pop("preset", preset)
        cfg = _apply(_preset(preset), dict(_flatten(data)))
    else:
        cfg = _preset(preset)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def _preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _flatten(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _apply(cfg: Config, flat: dict[str, Any]) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    section_names = {f.name for f in fields(cfg)}
    for key, val in flat.items():
        if "." not in key:
            if key != "preset":
                raise ConfigError(f"{key} is not a config field; sections are {sorted(section_names - {'preset'})}")
            top[key] = str(val)
            continue
        sec, name = key.split(".", 1)
        if sec not in section_names or sec == "preset":
            raise ConfigError(f"{key}: unknown section {sec!r}; sections are {sorted(section_names - {'preset'})}")
        section = getattr(cfg, sec)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            raise ConfigError(f"{key} is not a config field; {sec} has {sorted(hints)}")
        sections.setdefault(sec, {})[name] = _coerce(key, val, hints[name])
    new = {sec: replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()}
    return replace(cfg, **new, **top)


def _coerce(key: str, val: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if val not in choices:
            raise ConfigError(f"{key}={val!r} must be one of {list(choices)}")
        return val
    if tp is bool:
        if isinstance(val, bool):
            return val
        if isinstance(val, str) and val.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return val.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}={val!r} must be a boolean")
    if tp is int:
        if isinstance(val, bool):
            raise ConfigError(f"{key}={val!r} must be an integer")
        try:
            if isinstance(val, float) and not val.is_integer():
                raise ValueError
            return int(val) if not isinstance(val, str) else int(val, 0)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={val!r} must be an integer") from None
    if tp is float:
        if isinstance(val, bool):
            raise ConfigError(f"{key}={val!r} must be a number")
        try:
            return float(val)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={val!r} must be a number") from None
    if tp is str:
        return str(val)
    if origin is tuple:
        args = typing.get_args(tp)
        items = val.split(",") if isinstance(val, str) else list(val)
        if len(items) != len(args):
            raise ConfigError(f"{key}={val!r} must have {len(args)} values")
        return tuple(_coerce(key, x, a) for x, a in zip(items, args))
    raise ConfigError(f"{key}: unsupported field type {tp!r}")
