"""Every command x every class of user mistake: exit status 2, exactly one line on stderr
``tgdp.<cmd>: error: ...``, no traceback, never the advice to unpickle with ``weights_only=False``.

A command joins with one line in ``COMMANDS``: how it takes each kind of input (a config, a
checkpoint, a data folder, an output path, an invalid value). A kind it does not take is None, and
the mistakes needing it do not apply to it. Every mistake applies to at least one command.
"""

from __future__ import annotations

import argparse
import builtins
import errno
import importlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from _train_helpers import env as sub_env
from tgdp.configs import apply_overrides, tiny, to_dict

SMALL_MODEL = {"model.depth": 2, "model.modality_specific_depth": 1, "model.img_size": 32,
               "model.audio_length": 64, "model.decoder_depth": 1}
SMALL_ARGS = [x for k, v in SMALL_MODEL.items() for x in (f"--{k}", str(v))]
UNWRITABLE = "/sys/tgdp-cli-test"   # mkdir fails (read-only sysfs) even for root: EPERM


@dataclass(frozen=True)
class Command:
    """One command line. Each builder returns an argv that is valid except for the one input given."""

    name: str                                              # "tgdp.eval retrieval": the test id
    valid: Callable[[dict], list[str]]                     # a valid command line (mistakes perturb it)
    module: str | None = None                              # what `python -m` runs (default: the prog)
    config: Callable[[dict], list[str]] | None = None      # argv that takes dotted overrides
    toml: bool = True                                      # ... and --config FILE
    ckpt: Callable[[dict, str], list[str]] | None = None   # argv reading a checkpoint file
    data: Callable[[dict, str], list[str]] | None = None   # argv reading a data folder / input list / log
    out: Callable[[dict, str], list[str]] | None = None    # argv writing under an output path
    bad_value: Callable[[dict], list[str]] | None = None   # argv with one invalid option value

    @property
    def prog(self) -> str:
        return self.name.split()[0]

    @property
    def main_module(self) -> str:
        return self.module or self.prog


def _train(e, *more):
    return ["--preset", "tiny", *SMALL_ARGS, "--train.batch_size", "4", "--data.num_workers", "0",
            "--train.out_dir", str(e["tmp"] / "run"), *more]


def _ab(e, *more, data=None, out=None):
    return ["--data", data or e["shards"], "--val-data", e["shards"], "--variants", "baseline,tgdp", "--seeds", "1",
            "--steps", "1", "--out", out or str(e["tmp"] / "ab"), "--preset", "tiny", *SMALL_ARGS,
            "--train.batch_size", "2", "--data.num_workers", "0", *more]


def _rt(e, *more):
    return ["retrieval", "--device", "cpu", "--out", str(e["tmp"] / "ev"), *more]


COMMANDS = [
    Command("tgdp.train", lambda e: _train(e, "--data.root", "random", "--train.steps", "1"),
            config=lambda e: _train(e, "--data.root", "random", "--train.steps", "1"),
            ckpt=lambda e, p: _train(e, "--data.root", "random", "--train.steps", "1", "--train.init", p),
            data=lambda e, p: _train(e, "--data.root", p),
            out=lambda e, p: _train(e, "--data.root", "random", "--train.steps", "1", "--train.out_dir", p),
            bad_value=lambda e: _train(e, "--data.root", "random", "--train.precision", "fp8")),
    Command("tgdp.eval retrieval", lambda e: ["retrieval", "--features", e["features"], "--out", str(e["tmp"])],
            "tgdp.eval.__main__", toml=False,
            config=lambda e: _rt(e, "--ckpt", e["ckpt"], "--data", e["empty"]),
            ckpt=lambda e, p: _rt(e, "--ckpt", p, "--data", e["shards"]),
            data=lambda e, p: _rt(e, "--ckpt", e["ckpt"], "--data", p),
            out=lambda e, p: ["retrieval", "--features", e["features"], "--out", p],
            bad_value=lambda e: ["retrieval", "--features", e["features"], "--ties", "sometimes"]),
    Command("tgdp.eval probe", lambda e: ["probe", "--ckpt", e["ckpt"], "--data", e["shards"], "--device", "cpu"],
            "tgdp.eval.__main__",
            ckpt=lambda e, p: ["probe", "--ckpt", p, "--data", e["shards"], "--device", "cpu"],
            data=lambda e, p: ["probe", "--ckpt", e["ckpt"], "--data", p, "--device", "cpu"],
            bad_value=lambda e: ["probe", "--ckpt", e["ckpt"], "--data", e["shards"], "--epochs", "0"]),
    Command("tgdp.eval plot-log", lambda e: ["plot-log", "--log", e["log"], "--out", str(e["tmp"] / "c.png")],
            "tgdp.eval.__main__",
            data=lambda e, p: ["plot-log", "--log", p, "--out", str(e["tmp"] / "c.png")],
            out=lambda e, p: ["plot-log", "--log", e["log"], "--out", p + "/c.png"]),
    Command("tgdp.convert import",
            lambda e: ["import", e["official"], str(e["tmp"] / "imp.pt"), "--preset", "tiny", *SMALL_ARGS],
            config=lambda e: ["import", e["official"], str(e["tmp"] / "imp.pt"), "--preset", "tiny", *SMALL_ARGS],
            ckpt=lambda e, p: ["import", p, str(e["tmp"] / "imp.pt"), "--preset", "tiny", *SMALL_ARGS],
            out=lambda e, p: ["import", e["official"], p + "/imp.pt", "--preset", "tiny", *SMALL_ARGS]),
    Command("tgdp.convert export", lambda e: ["export", e["ckpt"], str(e["tmp"] / "exp.pth")],
            ckpt=lambda e, p: ["export", p, str(e["tmp"] / "exp.pth")],
            out=lambda e, p: ["export", e["ckpt"], p + "/exp.pth"],
            bad_value=lambda e: ["export", e["ckpt"], str(e["tmp"] / "exp.pth"), "--weights", "both"]),
    Command("tgdp.prepare", lambda e: ["--src", e["videos"], "--out", str(e["tmp"] / "p"), "--workers", "0"],
            data=lambda e, p: ["--src", p, "--out", str(e["tmp"] / "prep"), "--workers", "0", "--no-progress"],
            out=lambda e, p: ["--src", e["videos"], "--out", p, "--workers", "0", "--no-progress"],
            bad_value=lambda e: ["--src", e["videos"], "--out", str(e["tmp"] / "p2"), "--shard-size", "0"]),
    Command("tgdp.flops", lambda e: ["--preset", "tiny", *SMALL_ARGS],
            config=lambda e: ["--preset", "tiny", *SMALL_ARGS],
            bad_value=lambda e: ["--preset", "tiny", "--batch", "0"]),
    Command("tgdp.perf", lambda e: ["--preset", "tiny", *SMALL_ARGS],
            config=lambda e: ["--preset", "tiny", *SMALL_ARGS],
            bad_value=lambda e: ["--preset", "tiny", "--eff", "matmul=2,0.8"]),
    Command("tgdp.ablate", lambda e: _ab(e), "tgdp.ablate.__main__",
            config=lambda e: _ab(e),
            data=lambda e, p: _ab(e, data=p),
            out=lambda e, p: _ab(e, out=p),
            bad_value=lambda e: _ab(e, "--seeds", "0")),
    Command("tgdp.gpucheck", lambda e: ["--cpu-smoke", "--out", str(e["tmp"] / "gc")], "tgdp.gpucheck.__main__",
            bad_value=lambda e: ["--cpu-smoke", "--budget", "0"]),
    Command("tgdp.kernels.aot", lambda e: ["--batch", "1", "--shard", "0/1000"],
            bad_value=lambda e: ["--batch", "0"]),
    Command("tgdp.data.synthetic", lambda e: ["--out", str(e["tmp"] / "syn"), "--n", "1", "--workers", "0"],
            out=lambda e, p: ["--out", p, "--n", "1", "--n-val", "1", "--workers", "0", "--no-progress"],
            bad_value=lambda e: ["--out", str(e["tmp"] / "syn"), "--n", "0"]),
]


def _no_bars(monkeypatch) -> None:
    import tqdm

    init = tqdm.tqdm.__init__

    def quiet(self, *a, **k):
        init(self, *a, **{**k, "disable": True})

    monkeypatch.setattr(tqdm.tqdm, "__init__", quiet)


def _unreadable(monkeypatch, path: str) -> None:
    """``path`` raises EACCES when opened (chmod 000 does not stop root, so opening is refused here)."""
    real = builtins.open

    def guarded(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


def _disk_full(monkeypatch, _path: str) -> None:
    """Every atomic write fails as on a full disk (ENOSPC at fsync, like a real write; no path)."""
    import tgdp.atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tgdp.atomic.os, "fsync", full)


# mistake -> (input kind, the bad input: fixture key, literal path or extra argv; setup; words the line holds)
MISTAKES = {
    "unknown flag": ("any", None, None, ["--no-such-flag"]),
    "invalid option value": ("bad_value", None, None, []),
    "unknown config key": ("config", ["--train.stepz", "5"], None, ["did you mean train.steps"]),
    "bad config value": ("config", ["--train.lr", "abc"], None, ["train.lr='abc'"]),
    "config file missing": ("toml", ["--config", "{missing}"], None, ["config file {missing} does not exist"]),
    "config file not TOML": ("toml", ["--config", "{bad_toml}"], None, ["not valid TOML", "line 2"]),
    "config file unreadable": ("toml", ["--config", "{good_toml}"], ("unreadable", "good_toml"),
                               ["permission denied", "{good_toml}"]),
    "checkpoint missing": ("ckpt", "missing", None, ["{missing}"]),
    "checkpoint random bytes": ("ckpt", "random", None, ["{random}", "not a readable torch checkpoint"]),
    "checkpoint text file": ("ckpt", "text", None, ["{text}"]),
    "checkpoint refused pickle": ("ckpt", "pickled", None, ["argparse.Namespace", "refuses"]),
    "checkpoint wrong keys": ("ckpt", "wrong_keys", None, ["3000"]),   # 3000 keys: a count, not a list
    "checkpoint unreadable": ("ckpt", "ckpt", ("unreadable", "ckpt"), ["permission denied", "{ckpt}"]),
    "data missing": ("data", "missing_dir", None, ["{missing_dir}"]),
    "data empty": ("data", "empty", None, []),
    "batch larger than the data": ("batch", "shards", None, ["batch_size=4", "2 clips"]),
    "output not writable": ("out", UNWRITABLE, None, [UNWRITABLE]),
    "disk full": ("out", "tmp_out", ("disk_full", None), ["no space left", "{tmp_out}"]),
}


def _applies(cmd: Command, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "toml":
        return cmd.config is not None and cmd.toml
    if kind == "batch":  # only training asks for full batches of a split
        return cmd.prog == "tgdp.train"
    return getattr(cmd, kind) is not None


def _cases():
    for mistake, (kind, _, _, _) in MISTAKES.items():
        for i, cmd in enumerate(COMMANDS):
            if _applies(cmd, kind):
                yield pytest.param(mistake, i, id=f"{cmd.name}: {mistake}")


def test_every_mistake_applies_to_some_command():
    assert {p.values[0] for p in _cases()} == set(MISTAKES)


def _argv(cmd: Command, mistake: str, e: dict) -> list[str]:
    kind, what, _, _ = MISTAKES[mistake]
    if kind == "any":
        base = cmd.valid(e)
        return base[:1] + ["--no-such-flag"] + base[1:] if not base[0].startswith("-") else ["--no-such-flag", *base]
    if kind == "bad_value":
        return cmd.bad_value(e)
    if kind in ("config", "toml"):
        return cmd.config(e) + [x.format(**e) for x in what]
    path = what if what.startswith("/") else e[what]
    return (cmd.data if kind == "batch" else getattr(cmd, kind))(e, path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from test_loader import write_dataset

    from tgdp.data.shards import new_manifest, write_manifest
    from tgdp.eval.common import VideoFeatures
    from tgdp.reference.model import CAVMAESync
    from tgdp.training.checkpoint import write_checkpoint

    d = tmp_path_factory.mktemp("inputs")
    cfg = apply_overrides(tiny(), SMALL_MODEL).validate()
    e = {"missing": str(d / "nope.pt"), "missing_dir": str(d / "no_such_folder")}
    (d / "bad.toml").write_text("[train]\nsteps = = 3\n")
    (d / "good.toml").write_text("[train]\nsteps = 3\n")
    (d / "random.bin").write_bytes(os.urandom(4096))
    (d / "text.txt").write_text("not a checkpoint\n" * 20)
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, d / "pickled.pt")
    torch.save({"model": {f"blocks.{i}.weight": torch.zeros(1) for i in range(3000)}, "config": to_dict(cfg)},
               d / "wrong_keys.pt")
    torch.manual_seed(0)
    model = CAVMAESync(cfg.model)
    write_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, d / "ckpt.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, d / "official.pth")
    (d / "empty").mkdir()
    write_manifest(d / "empty", new_manifest(img_size=32))
    write_dataset(d / "shards", [2], img=32)
    VideoFeatures(torch.randn(4, 16, 8), torch.randn(4, 16, 8), list("abcd"), [["x"]] * 4).save(d / "feats.pt")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (d / "videos").mkdir()
    (d / "videos" / "clip.mp4").write_bytes(b"not a video")
    e.update({k: str(d / f) for k, f in (("bad_toml", "bad.toml"), ("good_toml", "good.toml"),
                                          ("random", "random.bin"), ("text", "text.txt"),
                                          ("pickled", "pickled.pt"), ("wrong_keys", "wrong_keys.pt"),
                                          ("ckpt", "ckpt.pt"), ("official", "official.pth"),
                                          ("empty", "empty"), ("shards", "shards"), ("features", "feats.pt"),
                                          ("log", "metrics.jsonl"), ("videos", "videos"))})
    return e


@pytest.mark.parametrize("mistake, index", list(_cases()))
def test_one_line_exit_2(mistake, index, inputs, tmp_path, monkeypatch, capsys, one_thread):
    cmd = COMMANDS[index]
    e = {**inputs, "tmp": tmp_path, "tmp_out": str(tmp_path / "out")}
    argv = _argv(cmd, mistake, e)
    _, _, setup, words = MISTAKES[mistake]
    monkeypatch.delenv("TGDP_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _no_bars(monkeypatch)   # bars are not errors (test_cli checks the error line after an open bar)
    main = importlib.import_module(cmd.main_module).main
    if setup is not None:
        {"unreadable": _unreadable, "disk_full": _disk_full}[setup[0]](monkeypatch, e.get(setup[1]))
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (argv, out[-2000:], err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"{cmd.prog}: error: "), err
    assert "Traceback" not in err and "weights_only" not in err.lower().replace("-", "_")
    assert not lines[0].endswith("..."), "the message itself must be short, not cut by the safety net"
    for w in words:
        assert w.format(**e).lower() in lines[0].lower(), (w, lines[0])


@pytest.mark.parametrize("module", sorted({c.main_module for c in COMMANDS}))
def test_real_process_exit_status_and_debug(module, inputs, tmp_path):
    """Through ``python -m``: status 2 and one line; ``--debug`` shows the traceback (status 1)."""
    cmd = next(c for c in COMMANDS if c.main_module == module)
    argv = [sys.executable, "-m", module.removesuffix(".__main__"),
            *_argv(cmd, "unknown flag", {**inputs, "tmp": tmp_path})]
    p = subprocess.run(argv, capture_output=True, text=True, env=sub_env(), timeout=300, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"{cmd.prog}: error: ") and "--no-such-flag" in p.stderr
    p = subprocess.run([*argv, "--debug"], capture_output=True, text=True, env=sub_env(), timeout=300, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" in p.stderr, p.stderr[-2000:]
