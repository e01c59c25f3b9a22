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
