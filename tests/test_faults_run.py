"""Fault injection, training side: runs own their folders, checkpoint integrity and fallback, writability
first, config validation, non-finite parameters, logs per run. Every run is the shrunk tiny() model
on the noise source, in this process, through the one error path (tgdp.cli.run)."""

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import tgdp.atomic
from _faults import (flip, one_error_line, read_rows, small, tensor_data_offset, train, tree_hashes)
from tgdp.configs import Config, ConfigError, load
from tgdp.training.checkpoint import (CheckpointError, CheckpointManager, read_checkpoint, read_seal,
                                      verify_checkpoint, write_checkpoint)


@pytest.fixture
def no_compute(monkeypatch):
    """Building the model (the first compute of a run) fails the test."""
    import tgdp.training.trainer

    def forbid(*a, **k):
        raise AssertionError("the run built its model before the failure")
    monkeypatch.setattr(tgdp.training.trainer, "build_method", forbid)


def ckpt_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


# ----------------------------------------------------------------------------- runs own their folders

def test_fresh_run_in_another_runs_folder_is_refused_before_compute(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train(small(out, "--train.steps", "2", "--train.ckpt_every", "1"), capsys)[0] == 0
    before = tree_hashes(out)
    import tgdp.training.trainer
    monkeypatch.setattr(tgdp.training.trainer, "build_method", lambda *a: pytest.fail("model built"))
    code, _, err = train(small(out, "--train.steps", "2"), capsys)
    line = one_error_line(err)
    assert code == 2
    for choice in ("--train.resume true", "--train.out_dir", "--train.overwrite true"):
        assert choice in line
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    assert run_id in line and "checkpoints" in line
    assert tree_hashes(out) == before                 # nothing of the other run was touched


def test_overwrite_moves_the_old_run_aside_never_deletes(tmp_path, capsys):
    out = tmp_path / "run"
    train(small(out, "--train.steps", "2", "--train.ckpt_every", "1"), capsys)
    old = tree_hashes(out)
    old_id = json.loads((out / "summary.json").read_text())["run_id"]
    code, stdout, _ = train(small(out, "--train.steps", "3", "--train.overwrite", "true"), capsys)
    assert code == 0 and "moved the files of run" in stdout
    moved = [d for d in (out / "replaced").iterdir()]
    assert len(moved) == 1 and moved[0].name.endswith(old_id)
    assert {k: v for k, v in old.items()} == tree_hashes(moved[0])   # byte for byte, all of them
    new_id = json.loads((out / "summary.json").read_text())["run_id"]
    assert new_id != old_id
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["run_id"] for r in rows} == {new_id}
    assert read_seal(out / "checkpoints" / "step-00000003.pt").run_id == new_id


def test_foreign_and_other_run_files_are_never_deleted_nor_resumed(tmp_path, capsys):
    """Issue 11: a foreign step-00000099.pt with keep_last 1 deleted every real checkpoint, and the
    next resume failed on it. Now: ignored for resume, never pruned, and moved aside (not
    overwritten) if the run reaches its name."""
    out = tmp_path / "run"
    args = small(out, "--train.ckpt_every", "1", "--train.keep_last", "1")
    train([*args, "--train.steps", "2"], capsys)
    ck = out / "checkpoints"
    foreign = ck / "step-00000099.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "note": "not tgdp"}, foreign)
    other = ck / "step-00000050.pt"       # a checkpoint sealed by another run
    write_checkpoint({"model": {}}, other, run_id="someone-else", step=50)
    keep = {foreign: foreign.read_bytes(), other: other.read_bytes()}
    code, stdout, _ = train([*args, "--train.steps", "4", "--train.resume", "true"], capsys)
    assert code == 0
    assert "resumed from step-00000002.pt at step 2" in stdout
    assert "ignored, written by other runs (never deleted): step-00000050.pt" in stdout
    assert "ignored, no tgdp checksum (truncated, or not written by tgdp; never deleted): step-00000099.pt" in stdout
    assert all(p.read_bytes() == b for p, b in keep.items())
    assert ckpt_names(out) == ["step-00000004.pt", "step-00000050.pt", "step-00000099.pt"]  # own ones pruned
    name, *_ = (ck / "latest").read_text().split()
    assert name == "step-00000004.pt"


def test_a_fresh_run_next_to_a_foreign_checkpoint_file_is_refused(tmp_path, capsys, no_compute):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "checkpoints" / "step-00000099.pt")
    code, _, err = train(small(tmp_path, "--train.steps", "2"), capsys)
    assert code == 2 and "files tgdp did not write" in one_error_line(err)
    assert (tmp_path / "checkpoints" / "step-00000099.pt").is_file()


def test_save_moves_a_foreign_file_out_of_the_way(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, run_id="me")
    (tmp_path / "step-00000002.pt").write_bytes(b"user data")
    mgr.save({"model": {}}, 1)
    mgr.save({"model": {}}, 2)
    assert (tmp_path / "step-00000002.pt.displaced-1").read_bytes() == b"user data"
    assert read_seal(tmp_path / "step-00000002.pt").run_id == "me"
    assert not (tmp_path / "step-00000001.pt").exists()       # its own older one is pruned
    assert any("not written by this run" in n for n in mgr.notes)


def test_latest_names_an_existing_verified_file(tmp_path, capsys):
    out = tmp_path / "run"
    train(small(out, "--train.steps", "3", "--train.ckpt_every", "1", "--train.keep_last", "2"), capsys)
    name, run, sha = (out / "checkpoints" / "latest").read_text().split()
    path = out / "checkpoints" / name
    seal = verify_checkpoint(path)
    assert name == "step-00000003.pt" and run == f"run={seal.run_id}" and sha == f"sha256={seal.sha256}"
    assert read_checkpoint(path)["run_id"] == seal.run_id == json.loads((out / "summary.json").read_text())["run_id"]


def test_resume_prints_config_changes_and_refuses_another_model_shape(tmp_path, capsys):
    out = tmp_path / "run"
    train(small(out, "--train.steps", "2", "--train.ckpt_every", "2"), capsys)
    code, stdout, _ = train(small(out, "--train.steps", "3", "--train.resume", "true", "--train.lr", "1e-4"), capsys)
    assert code == 0
    assert "train.lr: 0.0003 -> 0.0001" in stdout and "train.steps: 2 -> 3" in stdout
    code, _, err = train(small(out, "--train.steps", "4", "--train.resume", "true", "--model.embed_dim", "64"), capsys)
    line = one_error_line(err)
    assert code == 2 and "model shape differs" in line and "model.embed_dim: 96 -> 64" in line
    assert ckpt_names(out) == ["step-00000002.pt", "step-00000003.pt"]


# ----------------------------------------------------------------------------- checkpoint integrity

def test_flipped_bytes_are_found_before_load(tmp_path, capsys):
    """Issue 11: a checkpoint with 16 flipped bytes was resumed without notice."""
    p = write_checkpoint({"model": {"w": torch.randn(4096)}, "config": {}}, tmp_path / "a.pt", run_id="r", step=1)
    assert read_checkpoint(p)["model"]["w"].shape == (4096,)
    flip(p, tensor_data_offset(p))
    assert torch.load(p, weights_only=True)["model"]["w"].shape == (4096,)   # torch alone does not notice
    with pytest.raises(CheckpointError, match=f"checkpoint {p} is corrupt"):
        read_checkpoint(p)


def test_corrupt_or_truncated_newest_checkpoints_fall_back_exactly(tmp_path, capsys):
    """The newest checkpoint is truncated and the one before has flipped bytes: resume names both,
    continues from the newest intact one, and the continued losses equal an uninterrupted run bit
    for bit (issue 11: the zip reader's error without the path, no fallback)."""
    args = ["--train.steps", "3", "--train.ckpt_every", "1", "--train.keep_last", "3"]
    train(small(tmp_path / "ref", *args), capsys)
    ref = {r["step"]: r["loss"] for r in read_rows(tmp_path / "ref" / "metrics.jsonl")}
    out = tmp_path / "run"
    train(small(out, *args), capsys)
    ck = out / "checkpoints"
    truncated, flipped = ck / "step-00000003.pt", ck / "step-00000002.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flip(flipped, tensor_data_offset(flipped))
    code, stdout, _ = train(small(out, *args, "--train.resume", "true"), capsys)
    assert code == 0
    assert f"checkpoint {truncated} is not a readable torch checkpoint" in stdout and f"checkpoint {flipped} is corrupt" in stdout
    assert stdout.count("trying the previous checkpoint") == 2
    assert "resumed from step-00000001.pt at step 1" in stdout
    got = {r["step"]: r["loss"] for r in read_rows(out / "metrics.jsonl")}
    assert got == ref                                # steps 2, 3 re-run exactly; no step logged twice
    for step in (1, 2, 3):
        verify_checkpoint(ck / f"step-0000000{step}.pt")
    # the torn file had lost its seal, so it was not provably this run's: moved aside, not overwritten
    assert (ck / "step-00000003.pt.displaced-1").stat().st_size < truncated.stat().st_size


def test_no_intact_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(small(out, "--train.steps", "1", "--train.ckpt_every", "1"), capsys)
    p = out / "checkpoints" / "step-00000001.pt"
    flip(p, tensor_data_offset(p))
    code, _, err = train(small(out, "--train.steps", "2", "--train.resume", "true"), capsys)
    line = one_error_line(err)
    assert code == 2 and f"no intact checkpoint in {out / 'checkpoints'}" in line and "--train.overwrite true" in line


def test_eval_and_convert_report_a_corrupt_or_malicious_checkpoint_in_one_line(tmp_path, capsys):
    from tgdp.eval.__main__ import main as eval_main

    good = write_checkpoint({"model": {"w": torch.randn(4096)}, "config": {}}, tmp_path / "c.pt", run_id="r")
    flip(good, tensor_data_offset(good))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "half.pt").write_bytes(good.read_bytes()[:500])
    from _faults import cli
    for name, expect in (("c.pt", "is corrupt"), ("evil.pt", "refuses to load"),
                         ("half.pt", "not a readable torch checkpoint"), ("none.pt", "does not exist")):
        code, _, err = cli(eval_main, "tgdp.eval", ["retrieval", "--ckpt", str(tmp_path / name), "--out",
                                                    str(tmp_path / "ev"), "--device", "cpu"], capsys)
        line = one_error_line(err)
        assert code == 2 and str(tmp_path / name) in line and expect in line, line
        assert "weights_only" not in err
    from tgdp.convert import main as convert_main
    for direction in ("import", "export"):
        code, _, err = cli(convert_main, "tgdp.convert", [direction, str(good), str(tmp_path / "out.pt")], capsys)
        line = one_error_line(err)
        assert code == 2 and f"checkpoint {good} is corrupt" in line, line
        assert not (tmp_path / "out.pt").exists()


# ----------------------------------------------------------------------------- writability first

def test_unwritable_out_dir_is_found_before_compute(tmp_path, capsys, no_compute, monkeypatch):
    """chmod cannot stop root (these tests often run as root): as root the same refusal (EACCES on
    the first write into the folder) is injected at the write; otherwise the folder is really chmod'ed."""
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        real_open = open

        def deny(path, *a, **k):
            if Path(path).parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr(tgdp.atomic, "open", deny, raising=False)
    else:
        out.chmod(0o500)
    try:
        code, _, err = train(small(out, "--train.steps", "2"), capsys)
    finally:
        out.chmod(0o700)
    assert code == 2 and one_error_line(err) == (f"tgdp.train: error: permission denied: {out}; fix its "
                                                 "permissions or choose another path")
    assert list(out.iterdir()) == []


def test_out_dir_or_checkpoints_that_is_a_file_is_one_line_before_compute(tmp_path, capsys, no_compute):
    (tmp_path / "f").write_text("x")
    code, _, err = train(small(tmp_path / "f", "--train.steps", "2"), capsys)
    assert code == 2 and f"{tmp_path / 'f'} (or a parent) is a file" in one_error_line(err)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    code, _, err = train(small(tmp_path / "run", "--train.steps", "2"), capsys)
    assert code == 2 and f"{tmp_path / 'run' / 'checkpoints'} (or a parent) is a file" in one_error_line(err)


def test_disk_full_during_a_save_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    """ENOSPC injected while the step-4 checkpoint is being written (after some bytes went out)."""
    out = tmp_path / "run"
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fill(path, *a, **k):
        fh = real_open(path, *a, **k)
        return Full(fh) if ".tmp-step-00000004.pt" in str(path) else fh
    monkeypatch.setattr(tgdp.atomic, "open", fill, raising=False)
    code, _, err = train(small(out, "--train.steps", "4", "--train.ckpt_every", "2"), capsys)
    assert code == 2 and one_error_line(err) == (
        f"tgdp.train: error: no space left on the device while writing {out / 'checkpoints' / 'step-00000004.pt'}"
        "; free space or choose another folder")
    assert ckpt_names(out) == ["step-00000002.pt"] and not list((out / "checkpoints").glob(".tmp-*"))
    verify_checkpoint(out / "checkpoints" / "step-00000002.pt")
    assert (out / "checkpoints" / "latest").read_text().split()[0] == "step-00000002.pt"


# ----------------------------------------------------------------------------- validation

def _float_fields() -> list[str]:
    out = []
    for sec in dataclasses.fields(Config):
        obj = getattr(Config(), sec.name)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if isinstance(v, float) or (isinstance(v, tuple) and v and isinstance(v[0], float)):
                    out.append(f"{sec.name}.{f.name}")
    return out


@pytest.mark.parametrize("field", _float_fields())
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_field_rejects_nan_and_inf(field, bad):
    section, name = field.split(".")
    default = getattr(getattr(Config(), section), name)
    value = ",".join([bad] * len(default)) if isinstance(default, tuple) else bad
    with pytest.raises(ConfigError, match=rf"^{field}=.*must be a finite number"):
        load("tiny", overrides={field: value})


def test_float_fields_found():
    assert {"train.lr", "train.betas", "masking.rec_ratio", "data.fbank_std", "teacher.momentum"} <= set(_float_fields())


@pytest.mark.parametrize("over, expect", [
    ({"masking.rec_ratio": "0"}, "masking.rec_ratio=0.0 masks no audio patch"),
    ({"masking.rec_ratio": "0.999"}, "masking.rec_ratio=0.999 leaves no visible"),
    ({"masking.con_ratio": "0.99"}, "masking.con_ratio=0.99 leaves no visible video patch of 36"),
])
def test_mask_ratios_leaving_nothing_are_refused(over, expect):
    with pytest.raises(ConfigError, match=expect):
        load("tiny", overrides=over)


def test_batch_larger_than_the_data_is_found_from_the_manifest(tmp_path, capsys, no_compute, monkeypatch):
    from test_loader import write_dataset
    import tgdp.data.loader

    write_dataset(tmp_path / "shards", [3])
    monkeypatch.setattr(tgdp.data.loader, "decode_image", lambda *a: pytest.fail("decoded"))
    code, _, err = train(small(tmp_path / "run", "--data.root", str(tmp_path / "shards"), "--train.steps", "2",
                               "--train.batch_size", "4"), capsys)
    assert code == 2
    assert f"train.batch_size=4 is larger than the 3 clips of {tmp_path / 'shards'}" in one_error_line(err)


def test_nonfinite_parameters_stop_the_run_and_are_never_saved(tmp_path, capsys):
    """Issue 11: --train.lr inf left 142 of 210 tensors non-finite in the checkpoint while only 2 steps
    were counted non-finite. inf is refused now; a finite lr that overflows fp32 (1e39) still makes
    every parameter NaN/Inf after one step, with a finite loss and gradient."""
    out = tmp_path / "run"
    train(small(out, "--train.steps", "2", "--train.ckpt_every", "2"), capsys)
    good = (out / "checkpoints" / "step-00000002.pt").read_bytes()
    for log_every, ckpt_every in ((1, 4), (10, 1)):     # found at a log step / before a save
        code, _, err = train(small(out, "--train.steps", "6", "--train.resume", "true", "--train.lr", "1e39",
                                   "--train.log_every", str(log_every), "--train.ckpt_every", str(ckpt_every)),
                             capsys)
        line = one_error_line(err)
        assert code == 2 and "parameters became NaN/Inf between step 3 and step 3" in line
        assert str(out / "checkpoints" / "step-00000002.pt") in line and "lower --train.lr" in line
        assert ckpt_names(out) == ["step-00000002.pt"]
        assert (out / "checkpoints" / "step-00000002.pt").read_bytes() == good


# ----------------------------------------------------------------------------- logs per run

def test_one_row_log_plots_and_exits_0(tmp_path):
    """Issue 14: a run with exactly one log row exited 1 after training (read_log took the one-line
    JSONL for one JSON object)."""
    from _train_helpers import run_train
    p = run_train(small(tmp_path, "--train.steps", "2", "--train.log_every", "5"))
    assert p.returncode == 0
    assert len(read_rows(tmp_path / "metrics.jsonl")) == 1
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_read_log_one_row_and_torn_last_line(tmp_path):
    from tgdp.eval.plots import read_log
    (tmp_path / "m.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    assert read_log(tmp_path / "m.jsonl") == [{"step": 5, "loss": 1.0}]
    (tmp_path / "n.jsonl").write_text('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    assert read_log(tmp_path / "n.jsonl") == [{"step": 5, "loss": 1.0}]


def test_resumed_run_never_logs_a_step_twice(tmp_path, capsys):
    """Rows logged after the checkpoint a resume continues from are dropped before they are logged
    again; CSV and JSONL agree row for row."""
    out = tmp_path / "run"
    train(small(out, "--train.steps", "4", "--train.ckpt_every", "2"), capsys)
    (out / "checkpoints" / "step-00000004.pt").unlink()       # as if killed after logging step 4
    (out / "checkpoints" / "latest").unlink()
    train(small(out, "--train.steps", "5", "--train.ckpt_every", "2", "--train.resume", "true"), capsys)
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and len({r["run_id"] for r in rows}) == 1
    csv_steps = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == ["1", "2", "3", "4", "5"]


def test_plots_never_draw_backwards(tmp_path, monkeypatch):
    """A log that holds two runs and a resumed run's repeated steps (issue 14: steps 10..40, 10, 20)."""
    from matplotlib.axes import Axes
    from tgdp.eval.plots import plot_loss_curves

    rows = [{"step": s, "loss": 1.0 / s, "run_id": "a"} for s in (10, 20, 30, 40)]
    rows += [{"step": s, "loss": 2.0 / s, "run_id": "b"} for s in (10, 20, 30, 20, 30)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, **k: drawn.append((list(x), list(y))) or real(self, x, y, **k))
    plot_loss_curves(tmp_path / "m.jsonl", tmp_path / "p.png", keys=["loss"])
    assert drawn == [([10.0, 20.0, 30.0], [0.2, 0.1, 2.0 / 30])]      # run b only, last row per step


def test_summary_and_every_row_carry_skips_and_the_run_id(tmp_path, capsys):
    out = tmp_path / "run"
    train(small(out, "--train.steps", "2"), capsys)
    summary = json.loads((out / "summary.json").read_text())
    rows = read_rows(out / "metrics.jsonl")
    assert summary["skipped"] == {} and summary["skipped_total"] == 0
    assert all(r["skipped"] == {} and r["skipped_total"] == 0 and r["run_id"] == summary["run_id"] for r in rows)


def test_write_checkpoint_keeps_a_plain_torch_file(tmp_path):
    """The seal is the zip comment: torch.load and zipfile read a sealed file as usual."""
    import zipfile
    p = write_checkpoint({"w": torch.arange(5)}, tmp_path / "x.pt", run_id="r", step=3)
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(5))
    assert zipfile.ZipFile(p).comment.startswith(b"TGDP-CKPT1 ")
    seal = read_seal(p)
    assert (seal.run_id, seal.step) == ("r", 3)
    shutil.copy(p, tmp_path / "copy.pt")                        # the checksum travels with a copy
    assert verify_checkpoint(tmp_path / "copy.pt").sha256 == seal.sha256


@pytest.mark.dist
def test_torchrun_one_row_log_refusal_and_resume(tmp_path):
    """Under torchrun: a one-row log (issue 14: exit 1), then a fresh run into the same folder is
    refused on every rank (rank 0 decides and tells the others: no hang), then a resume works."""
    from _train_helpers import run_train
    args = small(tmp_path, "--train.steps", "2", "--train.log_every", "5", "--train.ckpt_every", "2")
    run_train(args, nproc=2)
    assert len(read_rows(tmp_path / "metrics.jsonl")) == 1 and (tmp_path / "loss_curves.png").is_file()
    p = run_train(args, nproc=2, check=False, timeout=180)
    assert p.returncode != 0 and p.stderr.count("--train.overwrite true") >= 2      # both ranks say why
    run_train(small(tmp_path, "--train.steps", "3", "--train.log_every", "5", "--train.resume", "true"), nproc=2)
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [2, 3]
