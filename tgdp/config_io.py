"""The machinery behind :mod:`tgdp.configs`: dotted overrides, typed coercion, TOML in and out.

It works on any config made of frozen dataclass *sections* (``cfg.model.depth``) plus plain
top-level fields (``cfg.preset``), and knows nothing about tgdp's own sections or presets, so it
imports nothing from tgdp: :mod:`tgdp.configs` imports it (``load``/``from_dict`` there bind the
presets) and re-exports :class:`ConfigError`, :func:`apply_overrides`, :func:`parse_cli_overrides`
and :func:`to_dict`. Import those from :mod:`tgdp.configs`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

__all__ = ["ConfigError", "to_dict", "from_dict", "apply_overrides", "parse_cli_overrides", "load",
           "field_names", "did_you_mean", "type_name", "to_toml", "check"]


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the dotted field."""


Presets = Mapping[str, Callable[[], Any]]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (JSON/TOML-safe), saved in every checkpoint and run summary."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(presets: Presets, d: dict[str, Any], base: Any = None) -> Any:
    """Build a config from a nested dict on top of ``base`` (default: the dict's own preset)."""
    d = dict(d)
    preset = d.pop("preset", None)
    if base is None:
        base = _preset(presets, preset or "paper")
    flat = dict(_flatten(d))
    if preset is not None:
        flat["preset"] = preset
    return _apply(base, flat)


def apply_overrides(cfg: Any, overrides: dict[str, Any] | list[str]) -> Any:
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
            raise ConfigError(f"unrecognised argument {tok!r}: expected a flag of this command (see --help) "
                              "or a dotted override like --model.depth 4")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override --{key} has no value; write --{key} VALUE")
            i += 1
            val = argv[i]
        out[key] = val
        i += 1
    return out


def load(presets: Presets, preset: str = "paper", file: str | Path | None = None,
         overrides: dict[str, Any] | list[str] | None = None) -> Any:
    """Preset, then TOML file (``[model]`` tables etc.), then dotted overrides; validated."""
    if file is not None:
        if not Path(file).is_file():
            what = "is a folder" if Path(file).is_dir() else "does not exist"
            raise ConfigError(f"config file {file} {what}; check the path (python -m tgdp.train --print-config "
                              "> run.toml writes a complete one)")
        with open(file, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {file} is not valid TOML: {exc}; fix it (python -m "
                                  "tgdp.train --print-config shows a complete file)") from None
        preset = data.pop("preset", preset)
        try:
            cfg = _apply(_preset(presets, preset), dict(_flatten(data)))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {file})") from None
    else:
        cfg = _preset(presets, preset)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


# ----------------------------------------------------------------------------- discovery

def field_names(cfg: Any) -> list[str]:
    """Every dotted field name of ``cfg`` (``"model.depth"``, ..., top-level fields as ``"preset"``)."""
    names = []
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            names += [f"{f.name}.{g.name}" for g in fields(section)]
        else:
            names.append(f.name)
    return names


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str | None:
    """The closest of ``choices`` to a mistyped ``name`` (difflib), or None.

    Dotted names are compared part by part, so a shared section prefix does not make two fields
    look alike: ``train.stepz`` -> ``train.steps``, ``trian.steps`` -> ``train.steps``,
    ``model.lr`` -> ``train.lr``, ``train.qqq`` -> None."""
    choices = list(choices)
    if "." not in name:
        best = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
        return best[0] if best else None
    sec, leaf = name.split(".", 1)
    by_section: dict[str, list[str]] = {}
    for c in choices:
        if "." in c:
            s, f = c.split(".", 1)
            by_section.setdefault(s, []).append(f)
    for s in difflib.get_close_matches(sec, list(by_section), n=3, cutoff=0.6):
        best = difflib.get_close_matches(leaf, by_section[s], n=1, cutoff=0.6)
        if best:
            return f"{s}.{best[0]}"
    exact = [f"{s}.{leaf}" for s, fs in by_section.items() if leaf in fs]  # right field, wrong section
    return exact[0] if exact else None


def _unknown(what: str, name: str, choices: typing.Iterable[str], otherwise: str,
             short: str | None = None) -> ConfigError:
    """``<what>; did you mean X? (<short>)`` when a choice is close, else ``<what>; <otherwise>``."""
    best = did_you_mean(name, choices)
    if best is not None:
        return ConfigError(f"{what}; did you mean {best}? ({short or otherwise})")
    return ConfigError(f"{what}; {otherwise}")


def type_name(tp: Any) -> str:
    """``int``, ``float``, ``bool``, ``str``, ``"a" | "b"``, ``2 floats``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"{len(args)} {type_name(args[0])}s" if len(set(args)) == 1 else \
            "(" + ", ".join(type_name(a) for a in args) + ")"
    return getattr(tp, "__name__", str(tp))


def to_toml(cfg: Any, docs: Mapping[str, str] | None = None) -> str:
    """The whole config as a TOML file that :func:`load` reads back to the same config.

    Above each field a one-line comment: ``# <type>, default <class default>: <docs[name]>``
    (``docs`` maps dotted field names, and section names, to one-line meanings).
    """
    docs = docs or {}
    lines: list[str] = []
    sections = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            lines += [f"# {docs.get(f.name, '')}".rstrip(), f"{f.name} = {_toml_value(value)}"]
    for name, section in sections:
        lines += ["", *([f"# {docs[name]}"] if name in docs else []), f"[{name}]"]
        hints = typing.get_type_hints(type(section))
        for g in fields(section):
            default = g.default if g.default is not dataclasses.MISSING else g.default_factory()  # type: ignore[misc]
            meaning = docs.get(f"{name}.{g.name}", "")
            lines.append(f"# {type_name(hints[g.name])}, default {_toml_value(default)}: {meaning}".rstrip(": "))
            lines.append(f"{g.name} = {_toml_value(getattr(section, g.name))}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


# ----------------------------------------------------------------------------- internals

def _preset(presets: Presets, name: str) -> Any:
    if name not in presets:
        raise _unknown(f"preset={name!r} is unknown", str(name), presets, f"choose one of {sorted(presets)}")
    return presets[name]()


def _flatten(d: dict[str, Any], prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _apply(cfg: Any, flat: dict[str, Any]) -> Any:
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    section_names = {f.name for f in fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    top_names = {f.name for f in fields(cfg)} - section_names
    for key, val in flat.items():
        if "." not in key:
            if key not in top_names:
                raise _unknown(f"{key} is not a config field", key, field_names(cfg),
                               f"sections are {sorted(section_names)}; --print-config lists every field")
            top[key] = str(val)
            continue
        sec, name = key.split(".", 1)
        if sec not in section_names:
            raise _unknown(f"{key}: unknown section {sec!r}", key, field_names(cfg),
                           f"sections are {sorted(section_names)}; --print-config lists every field")
        section = getattr(cfg, sec)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            raise _unknown(f"{key} is not a config field", key, field_names(cfg),
                           f"{sec} has {', '.join(hints)}; --print-config describes them",
                           "--print-config lists every field")
        sections.setdefault(sec, {})[name] = _coerce(key, val, hints[name])
    new = {sec: replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()}
    return replace(cfg, **new, **top)


def _coerce(key: str, val: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if val not in choices:
            raise _unknown(f"{key}={val!r} is not a choice", str(val), [str(c) for c in choices],
                           f"must be one of {list(choices)}")
        return val
    if tp is bool:
        if isinstance(val, bool):
            return val
        if isinstance(val, str) and val.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return val.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}={val!r} must be a boolean (true or false)")
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
            raise ConfigError(f"{key}={val!r} must have {len(args)} values (e.g. {key}=" +
                              ",".join("0.9" if a is float else "1" for a in args) + ")")
        return tuple(_coerce(key, x, a) for x, a in zip(items, args))
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def check(ok: bool, name: str, value: object, why: str) -> None:
    """Raise ``ConfigError("<name>=<value!r> <why>")`` unless ``ok`` (the config sections' validators)."""
    if not ok:
        raise ConfigError(f"{name}={value!r} {why}")
