"""Module structure: no import cycles among tgdp modules; every command's --help is fast (imports no
torch) and renders cleanly (no reST markup, no doubled or empty defaults, every option described)."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _train_helpers import REPO, env

COMMANDS = ["tgdp.train", "tgdp.eval", "tgdp.convert", "tgdp.prepare", "tgdp.flops", "tgdp.perf",
            "tgdp.data.synthetic", "tgdp.gpucheck", "tgdp.ablate"]
PACKAGES = ("tgdp.eval", "tgdp.gpucheck", "tgdp.ablate")   # commands that are packages: main() lives in __main__
HEAVY = ("torch", "numpy", "matplotlib", "av", "PIL", "tensorboard", "triton", "nvidia")


# ----------------------------------------------------------------------------- import cycles

def module_imports(root: Path, package: str = "tgdp") -> dict[str, set[str]]:
    """``module -> tgdp modules it imports``, from the source (ast): every import statement counts,
    at module level or inside a function (a lazy import still ties the two modules together), except
    under ``if TYPE_CHECKING:``. A package's own ``__init__`` is not an edge of its submodules."""
    files = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    edges: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        out = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".")[: len(mod.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    out.add(full if full in files else base)
        edges[mod] = {m for m in out if m in files and m != mod}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_lazy_and_relative_cycles(tmp_path):
    pkg = tmp_path / "tgdp"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tgdp import a\n")
    (pkg / "a.py").write_text("import tgdp.b\n")
    (pkg / "b.py").write_text("def f():\n    from tgdp.sub import c\n")            # lazy import
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")                        # relative import
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tgdp import e\n")
    (pkg / "e.py").write_text("from tgdp import d\n")
    assert cycles(module_imports(tmp_path)) == [["tgdp.a", "tgdp.b", "tgdp.sub.c"]]


def test_no_import_cycles_among_tgdp_modules():
    found = cycles(module_imports(REPO))
    assert found == [], f"import cycles (move the shared pieces to a module both sides import): {found}"


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_imports_nothing_heavy(cmd):
    """--help must answer at once (< 2 s): it may not import torch or the data/plot stack."""
    code = (f"import sys, runpy; sys.argv = [{cmd!r}, '--help']\n"
            f"try:\n    runpy.run_module({cmd!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            f"import json; print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    status, heavy = json.loads(p.stdout.strip().splitlines()[-1])
    assert status in (0, None) and heavy == [], heavy
    assert "usage: python -m " + cmd in p.stdout


def _parsers(cmd: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The command's parser (and its subcommands'), captured when main() parses."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    module = importlib.import_module(cmd + (".__main__" if cmd in PACKAGES else ""))
    with pytest.raises(SystemExit):
        module.main(["x"])
    monkeypatch.undo()
    parsers = [seen[0]]
    for action in seen[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_renders_cleanly_and_describes_every_option(cmd, monkeypatch):
    for ap in _parsers(cmd, monkeypatch):
        text = ap.format_help()
        for bad in ("``", ":func:", ":mod:", ":class:", "(default: None)", "%(default)"):
            assert bad not in text, (ap.prog, bad)
        fmt = ap._get_formatter()
        for action in ap._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and len(action.help) > 8, (ap.prog, action.dest)
            assert fmt._get_help_string(action).count("(default:") <= 1, (ap.prog, action.dest)


def test_eval_cli_tie_choices_match_the_metric():
    """tgdp.eval's parser lists the tie modes without importing tgdp.eval.retrieval (torch)."""
    from tgdp.eval.__main__ import TIES
    from tgdp.eval.retrieval import TIES as METRIC_TIES

    assert TIES == METRIC_TIES


def test_every_progress_bar_has_a_label():
    """Each tqdm bar in tgdp says what it counts (``desc=``): no more anonymous bars."""
    unlabelled = []
    for path in (REPO / "tgdp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "tqdm":
                if not any(k.arg == "desc" for k in node.keywords):
                    unlabelled.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert unlabelled == []
