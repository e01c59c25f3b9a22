"""Fault injection, data side: member checksums in both loaders, stale DALI indexes, skips surfaced in
training and evaluation, prepare with no usable clip / an unwritable --out / dying workers / SIGKILL,
and the audio channel rule. Small generated shards (tests/test_loader.py helpers) and clips
(tests/media.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import media
from _fault_workers import poison, sitecustomize_dir
from _faults import (cli, flip, jpeg_scan_offset, member_offset, one_error_line, read_rows, rewrite_tar_without,
                     small, train, tree_hashes)
from _train_helpers import REPO, env
from test_loader import S, write_dataset
from tgdp import prepare as prep
from tgdp.data.loader import CorruptSample, ShardDataset, TorchLoader, decode_image
from tgdp.data.shards import index_is_current, iter_shard, read_index, read_manifest, write_manifest
from tgdp.data.workers import DIED, SurvivingMap


def _with_checksums(root: Path) -> Path:
    """Mark a write_dataset folder as tgdp.prepare marks its output (checksums expected)."""
    m = read_manifest(root)
    m["member_checksums"] = "sha256"
    write_manifest(root, m)
    return root


def _flip_jpeg(tar: Path, member: str) -> bytes:
    """Flip 16 bytes inside the entropy-coded data of a JPEG member so that it still decodes (the
    silent case of issue 11), and return the damaged bytes."""
    off, size = member_offset(tar, member)
    original = tar.read_bytes()[off:off + size]
    scan = jpeg_scan_offset(original)
    for at in range(scan + 8, size - 40, 7):
        damaged = bytearray(original)
        for i in range(at, at + 16):
            damaged[i] ^= 0x55
        try:
            decode_image(bytes(damaged), S)
        except CorruptSample:
            continue
        data = bytearray(tar.read_bytes())
        data[off:off + size] = damaged
        tar.write_bytes(bytes(data))
        return bytes(damaged)
    raise AssertionError("no position where the flipped JPEG still decodes")


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """5 clips; clip002's frame 8 (the eval frame) has 16 flipped bytes that still decode."""
    root = tmp_path_factory.mktemp("flipped")
    ids = write_dataset(root, [5])
    _with_checksums(root)
    damaged = _flip_jpeg(root / "shard-000000.tar", "clip002.f08.jpg")
    return root, ids, damaged


# ----------------------------------------------------------------------------- member checksums

def test_flipped_jpeg_decodes_but_the_torch_loader_skips_it_as_checksum(flipped):
    root, ids, damaged = flipped
    assert decode_image(damaged, S).shape == (3, S, S)      # the damage is invisible to the decoder
    for mode in ("eval", "retrieval"):
        ld = TorchLoader(ShardDataset(root, mode, img_size=S), 2)
        assert [i for b in ld for i in b.ids] == [i for i in ids if i != "clip002"], mode
        assert dict(ld.skipped) == {"checksum": 1}, mode
    # only the members a sample uses are checked: forced to the intact frame 3, clip002 is used
    ld = TorchLoader(ShardDataset(root, "train", img_size=S, frame=3, shuffle=False), 2)
    assert sorted(i for b in ld for i in b.ids) == ids and not ld.skipped


def test_flipped_jpeg_dali_skips_it_like_torch(flipped):
    pytest.importorskip("nvidia.dali", reason="DALI is a test dependency")
    from tgdp.data.dali import DaliLoader

    root, ids, _ = flipped
    for mode in ("eval", "retrieval"):
        ld = DaliLoader(root, mode, img_size=S, batch_size=2)
        assert [i for b in ld for i in b.ids] == [i for i in ids if i != "clip002"], mode
        assert dict(ld.skipped) == {"checksum": 1}, mode


def test_metadata_edits_are_caught_by_the_json_checksum(tmp_path):
    """A label changed inside the JSON (still valid JSON) is a checksum mismatch, not new metadata."""
    write_dataset(tmp_path, [3])
    _with_checksums(tmp_path)
    tar = tmp_path / "shard-000000.tar"
    data = tar.read_bytes()
    off, size = member_offset(tar, "clip001.json")
    body = data[off:off + size]
    edited = body.replace(b'"labels": ["l1"]', b'"labels": ["l9"]')
    assert edited != body and len(edited) == len(body)
    tar.write_bytes(data[:off] + edited + data[off + size:])
    ld = TorchLoader(ShardDataset(tmp_path, "eval", img_size=S), 3)
    assert [i for b in ld for i in b.ids] == ["clip000", "clip002"] and dict(ld.skipped) == {"checksum": 1}


def test_shards_without_checksums_load_with_a_note(tmp_path, capsys):
    from test_loader import good_sample, parts_of, write_raw_shard
    from tgdp.configs import apply_overrides, tiny
    from tgdp.data.loader import make_loader
    from tgdp.data.shards import new_manifest

    samples = []
    for i in range(3):
        key, md, fl, jp = good_sample(i)
        samples.append((key, parts_of(key, md, fl, jp)))      # metadata without "checksums"
    write_raw_shard(tmp_path, "shard-000000.tar", samples)
    m = new_manifest(img_size=S)
    m["shards"] = [{"path": "shard-000000.tar", "count": 3}]
    write_manifest(tmp_path, m)
    cfg = apply_overrides(tiny(), {"model.img_size": S, "data.loader": "torch", "data.num_workers": 0})
    ld = make_loader(cfg, "eval", root=str(tmp_path), batch_size=3)
    assert [i for b in ld for i in b.ids] == ["clip000", "clip001", "clip002"] and not ld.skipped
    assert "carry no checksums" in capsys.readouterr().out


def test_dali_stale_index_after_a_member_deletion_keeps_intact_samples(tmp_path):
    """Issue 11: after a member deletion DALI's stale .idx dropped 3 intact samples."""
    pytest.importorskip("nvidia.dali", reason="DALI is a test dependency")
    from tgdp.data.dali import DaliLoader

    ids = write_dataset(tmp_path, [6])
    tar = tmp_path / "shard-000000.tar"
    fresh = read_index(tar.with_suffix(".idx"))
    assert index_is_current(tar, fresh)
    rewrite_tar_without(tar, "clip002.f05.jpg")
    assert not index_is_current(tar, read_index(tar.with_suffix(".idx")))     # the .idx was kept as it was
    ld = DaliLoader(tmp_path, "retrieval", img_size=S, batch_size=2)
    ref = TorchLoader(ShardDataset(tmp_path, "retrieval", img_size=S), 2)
    want = [i for i in ids if i != "clip002"]
    assert [i for b in ld for i in b.ids] == [i for b in ref for i in b.ids] == want
    assert dict(ld.skipped) == dict(ref.skipped) == {"missing member": 1}


# ----------------------------------------------------------------------------- skips surfaced

def test_train_rows_and_summary_count_skips_by_reason(tmp_path, capsys):
    root = tmp_path / "shards"
    write_dataset(root, [9])
    _with_checksums(root)
    for f in range(16):                      # every frame: whichever the epoch draws is damaged
        _flip_jpeg(root / "shard-000000.tar", f"clip004.f{f:02d}.jpg")
    out = tmp_path / "run"
    code, _, err = train(small(out, "--data.root", str(root), "--data.cache_frames", "0", "--train.steps", "3"), capsys)
    assert code == 0, err
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(set(r["skipped"]) <= {"checksum"} and r["skipped_total"] == sum(r["skipped"].values()) for r in rows)
    assert rows[-1]["skipped"]["checksum"] >= 1         # epoch 1 (9 clips, 8 used) was read to its end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == rows[-1]["skipped"] and summary["skipped_total"] >= 1
    assert "skipped" in (out / "metrics.csv").read_text().splitlines()[0]


def test_eval_states_how_many_of_the_manifest_it_evaluated(flipped, tmp_path, capsys):
    from test_retrieval import real_checkpoint
    from tgdp.eval.__main__ import main as eval_main

    root, ids, _ = flipped
    real_checkpoint(tmp_path)
    code, out, err = cli(eval_main, "tgdp.eval", ["retrieval", "--ckpt", str(tmp_path / "ckpt.pt"), "--data",
                                                  str(root), "--out", str(tmp_path / "ev"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"4 evaluated of 5 in the manifest ({root}); skipped: checksum: 1" in out
    cov = json.loads((tmp_path / "ev" / "retrieval.json").read_text())["coverage"]
    assert (cov["evaluated"], cov["in_manifest"], cov["skipped"]) == (4, 5, {"checksum": 1})


def test_eval_output_folder_is_checked_before_compute(tmp_path, capsys, monkeypatch):
    from tgdp.eval import common
    from tgdp.eval.__main__ import main as eval_main

    monkeypatch.setattr(common, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before the check"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "c.pt").write_bytes(b"never read")
    code, _, err = cli(eval_main, "tgdp.eval", ["retrieval", "--ckpt", str(tmp_path / "c.pt"), "--out",
                                                str(tmp_path / "file" / "ev")], capsys)
    assert code == 2 and "is a file, a folder was expected" in one_error_line(err)


# ----------------------------------------------------------------------------- prepare

def test_prepare_with_no_usable_clip_fails_after_writing_its_report(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.mp4").write_bytes(b"")
    (src / "noise.mkv").write_bytes(os.urandom(2048))
    with pytest.raises(prep.NothingPrepared):
        prep.prepare(src, tmp_path / "out", workers=0, progress=False)
    code, _, err = cli(lambda argv: prep.prepare(src, tmp_path / "out", workers=0, progress=False) and 0,
                       "tgdp.prepare", [], capsys)
    line = one_error_line(err)
    assert code == 2 and "no clip could be used: all 2 inputs" in line and "zero_length: 1" in line
    assert {s["reason"] for s in json.loads((tmp_path / "out" / "skipped.json").read_text())} == {
        "zero_length", "unreadable"}


def test_prepare_checks_out_before_decoding(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "decode_clip", lambda *a, **k: pytest.fail("decoded before the check"))
    media.write_clip(tmp_path / "a.mkv", seconds=1.0)
    (tmp_path / "out").write_text("a file")
    code, _, err = cli(lambda argv: prep.prepare(tmp_path, tmp_path / "out", workers=0, progress=False) and 0,
                       "tgdp.prepare", [], capsys)
    assert code == 2 and f"{tmp_path / 'out'} (or a parent) is a file" in one_error_line(err)


def test_surviving_map_retries_alone_then_gives_up(tmp_path):
    """A task that kills its worker once is retried alone and succeeds; one that kills it every time
    yields DIED; the others keep their results, in order, and nothing waits on a dead process."""
    t0 = time.monotonic()
    once = SurvivingMap(poison, 2)
    assert list(once([(1, "ok", ""), (2, "once", str(tmp_path / "m2")), (3, "ok", ""), (4, "ok", "")])) == [2, 4, 6, 8]
    assert once.died == 0 and once.retried >= 1
    always = SurvivingMap(poison, 2)
    assert list(always([(1, "ok", ""), (2, "always", ""), (3, "ok", ""), (4, "ok", ""), (5, "ok", "")])) == [
        2, DIED, 6, 8, 10]
    assert always.died == 1
    assert time.monotonic() - t0 < 120


@pytest.fixture
def clips(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, hz in enumerate((300, 500, 700, 900)):
        media.write_clip(src / f"c{i}.mkv", seconds=1.0, tone_hz=hz)
    return src


def test_prepare_survives_killed_workers(clips, tmp_path, monkeypatch):
    """c1's worker is killed every time it decodes it (as the OOM killer would): c1 is retried alone,
    then skipped as worker_died; the other clips (some in flight when the pool broke) are kept,
    byte-identical to an undisturbed run's."""
    ref = prep.prepare(clips, tmp_path / "ref", workers=0, shard_size=2, progress=False)
    monkeypatch.setenv("PYTHONPATH", f"{sitecustomize_dir(tmp_path / 'site')}{os.pathsep}{REPO}")
    monkeypatch.setenv("TGDP_FAULT_KILL", "c1")
    monkeypatch.setenv("TGDP_FAULT_DIR", str(tmp_path))
    got = prep.prepare(clips, tmp_path / "out", workers=2, shard_size=2, progress=False)
    assert [(s["id"], s["reason"]) for s in got["skipped"]] == [("c1", "worker_died")]
    samples = {s["key"]: s for e in got["shards"] for s in iter_shard(tmp_path / "out" / e["path"])}
    want = {s["key"]: s for e in ref["shards"] for s in iter_shard(tmp_path / "ref" / e["path"])}
    assert sorted(samples) == ["c0", "c2", "c3"]
    assert all(samples[k] == want[k] for k in samples)


def test_prepare_sigkill_then_rerun_is_byte_identical(clips, tmp_path):
    prep.prepare(clips, tmp_path / "ref", workers=0, shard_size=1, progress=False)
    out = tmp_path / "out"
    e = {**env(), "PYTHONPATH": f"{sitecustomize_dir(tmp_path / 'site')}{os.pathsep}{REPO}",
         "TGDP_FAULT_SLOW": "c3", "TGDP_FAULT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "tgdp.prepare", "--src", str(clips), "--out", str(out), "--workers", "2",
           "--shard-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=e, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:     # c3 sleeps in its worker: kill once 2 shards are recorded
            if (out / "manifest.json").is_file() and len(read_manifest(out)["shards"]) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        else:
            raise AssertionError("prepare too slow: no kill point reached")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not read_manifest(out)["complete"]
    subprocess.run(cmd[:-1] + ["--no-progress"], env=env(), cwd=REPO, check=True, capture_output=True, timeout=300)
    assert tree_hashes(out) == tree_hashes(tmp_path / "ref")


# ----------------------------------------------------------------------------- audio channels

def test_channels_first_flags_a_clip_silent_on_channel_0_and_mix_downmixes(tmp_path):
    import io

    import numpy as np
    import soundfile as sf

    src = tmp_path / "src"
    src.mkdir()
    media.write_clip(src / "left_silent.mkv", seconds=1.0, audio="silent", channels=2)   # ch1: 3 kHz tone
    media.write_clip(src / "mono.mkv", seconds=1.0)
    first = prep.prepare(src, tmp_path / "first", workers=0, progress=False)
    assert [(f["id"], f["reason"]) for f in first["flagged"]] == [("left_silent", "silent_channel")]
    assert json.loads((tmp_path / "first" / "flagged.json").read_text()) == first["flagged"]
    assert first["channels"] == "first"
    mix = prep.prepare(src, tmp_path / "mix", workers=0, progress=False, channels="mix")
    assert mix["flagged"] == [] and mix["channels"] == "mix"
    s = {x["key"]: x for e in mix["shards"] for x in iter_shard(tmp_path / "mix" / e["path"])}
    wave = sf.read(io.BytesIO(s["left_silent"]["flac"]))[0]
    assert 0.13 < np.abs(wave).max() < 0.17                   # (0 + 0.3 sin) / 2
    assert s["left_silent"]["meta"]["channel_peaks"][1] > 0.29


def test_mix_flags_a_phase_inverted_pair_that_mixes_to_silence(tmp_path):
    """channels=mix: L = -R sums to nothing; the clip is kept, flagged silent_channel (with both
    channels' peaks), while the first-channel rule keeps channel 0's tone unflagged."""
    src = tmp_path / "src"
    src.mkdir()
    media.write_clip(src / "inverted.mkv", seconds=1.0, channels=2, inverted=True)   # lossless PCM
    mix = prep.prepare(src, tmp_path / "mix", workers=0, progress=False, channels="mix")
    assert [(f["id"], f["reason"]) for f in mix["flagged"]] == [("inverted", "silent_channel")]
    meta = next(iter_shard(tmp_path / "mix" / mix["shards"][0]["path"]))["meta"]
    assert meta["silent"] and meta["silent_channel"] and min(meta["channel_peaks"]) > 0.29
    first = prep.prepare(src, tmp_path / "first", workers=0, progress=False)
    assert first["flagged"] == [] and sum(e["count"] for e in first["shards"]) == 1


def test_training_refuses_shards_of_another_channel_rule(tmp_path, capsys):
    write_dataset(tmp_path / "shards", [4])                    # prepared with the "first" rule
    code, _, err = train(small(tmp_path / "run", "--data.root", str(tmp_path / "shards"), "--train.steps", "1",
                               "--data.channels", "mix"), capsys)
    assert code == 2 and "was prepared with channels='first'" in one_error_line(err)
