"""The shared error path (tgdp.cli.run): one line, exit 2, traceback only with --debug."""

import errno

import pytest

from tgdp.cli import UserError, format_os_error, run
from tgdp.configs import ConfigError


def _raiser(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc, expect", [
    (UserError("no shards in /x, pass --data.root DIR"), "tgdp.t: error: no shards in /x, pass --data.root DIR"),
    (ConfigError("train.lr=inf must be finite"), "tgdp.t: error: config error: train.lr=inf must be finite"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/nope.toml"), "tgdp.t: error: no such file or folder: /nope.toml"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/ckpt.pt"), "tgdp.t: error: no space left on the device while writing /full/ckpt.pt"),
])
def test_expected_failures_are_one_line_exit_2(capsys, exc, expect):
    assert run("tgdp.t", _raiser(exc), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expect), err
    assert "Traceback" not in err


def test_debug_flag_reraises_and_is_removed_from_argv(monkeypatch):
    monkeypatch.delenv("TGDP_DEBUG", raising=False)
    with pytest.raises(UserError):
        run("tgdp.t", _raiser(UserError("x")), ["--debug"])
    seen = []
    assert run("tgdp.t", lambda argv: seen.append(argv) or 0, ["--a", "--debug", "b"]) == 0
    assert seen == [["--a", "b"]]


def test_env_debug_reraises(monkeypatch):
    monkeypatch.setenv("TGDP_DEBUG", "1")
    with pytest.raises(ConfigError):
        run("tgdp.t", _raiser(ConfigError("bad")), [])


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run("tgdp.t", _raiser(ZeroDivisionError()), [])


def test_long_messages_are_folded_to_one_bounded_line(capsys):
    run("tgdp.t", _raiser(UserError("missing keys:\n" + "k, " * 5000)), [])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 700


def test_format_os_error_permission():
    assert "permission denied: /ro/ckpt" in format_os_error(PermissionError(errno.EACCES, "Permission denied", "/ro/ckpt"))


def test_open_progress_bars_are_closed_before_the_error_line(capsys, monkeypatch):
    """A failure in the middle of a bar (a full disk at a checkpoint) still prints its own line."""
    from tqdm import tqdm

    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def main(argv):
        bar = tqdm(total=10, desc="train")
        bar.update(3)
        raise OSError(errno.ENOSPC, "No space left on device", "/run/ckpt.pt")

    assert run("tgdp.t", main, []) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == ("tgdp.t: error: no space left on the device while writing /run/ckpt.pt; "
                         "free space or choose another folder")
    assert lines[-2].startswith("train:") or lines[-2].strip().startswith("train:")


def test_writing_to_names_the_target_of_pathless_os_errors():
    from tgdp.cli import writing_to

    with pytest.raises(OSError) as info:
        with writing_to("/data/out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "no space left on the device while writing /data/out;" in format_os_error(info.value)
    with pytest.raises(FileNotFoundError) as info:       # an error that names its file keeps it
        with writing_to("/data/out"):
            open("/no/such/file")
    assert info.value.filename == "/no/such/file"


def test_unpickling_advice_is_never_passed_on(capsys):
    import pickle

    msg = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
           "succeed, but it can result in arbitrary code execution.")
    assert run("tgdp.t", _raiser(UserError("checkpoint /x.pt: " + msg)), []) == 2
    err = capsys.readouterr().err
    assert "weights_only" not in err and "/x.pt" in err and "refuses to unpickle" in err
    # a raw UnpicklingError is a bug path (read_checkpoint converts it); it keeps its traceback
    with pytest.raises(pickle.UnpicklingError):
        run("tgdp.t", _raiser(pickle.UnpicklingError(msg)), [])


@pytest.mark.parametrize("make, expect", [
    (lambda p: p.write_bytes(b"\x80\x02garbage" * 100), "is not a readable torch checkpoint"),
    (lambda p: p.write_text("hello\n"), "is not a readable torch checkpoint"),
    (lambda p: p.write_bytes(b""), "is not a readable torch checkpoint"),
])
def test_read_checkpoint_errors_name_the_file_and_never_advise_unsafe_loading(tmp_path, make, expect):
    from tgdp.training.checkpoint import CheckpointError, read_checkpoint

    path = tmp_path / "c.pt"
    make(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and expect in str(info.value)
    assert "weights_only" not in str(info.value)


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    import argparse

    import torch

    from tgdp.training.checkpoint import CheckpointError, read_checkpoint

    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match=r"holds a pickled argparse\.Namespace object, which tgdp refuses"):
        read_checkpoint(tmp_path / "o.pt")


def test_parser_usage_errors_are_user_errors_and_help_is_clean(capsys):
    from tgdp.cli import clean_doc, parser

    ap = parser("tgdp.t", "Run :func:`tgdp.x.y` on ``data``.")
    ap.add_argument("--n", type=int, default=3, help="count")
    ap.add_argument("--w", type=int, default=None, help="workers (default: all CPUs)")
    ap.add_argument("--flag", action="store_true", help="a switch")
    with pytest.raises(UserError, match=r"argument --n: invalid int value: 'x'; see python -m tgdp.t --help"):
        ap.parse_args(["--n", "x"])
    text = ap.format_help()
    assert "Run tgdp.x.y on data." in text and "count (default: 3)" in text
    assert "(default: None)" not in text and "a switch (default" not in text
    assert clean_doc(":class:`~tgdp.cli.UserError` and ``x``") == "tgdp.cli.UserError and x"


def test_fold():
    from tgdp.cli import fold

    assert fold(["a", "b"]) == "2 (a, b)"
    assert fold([f"k{i}" for i in range(3000)]) == "3000 (first 3: k0, k1, k2, ...)"
