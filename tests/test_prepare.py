"""tgdp.prepare + tgdp.data.shards: videos → webdataset shards, corrupt media, resume, DALI index.

Expected values come from the test media themselves (tests/media.py): every source frame carries
its index as a bar code and the audio is a known tone/click, so a stored frame or sound can be
traced back to the exact source frame or time.
"""

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import media
from tgdp import prepare as prep
from tgdp.data.shards import (ShardWriter, iter_shard, member_exts, read_index, read_manifest,
                              sanitize_key)

SR = 16000


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """The corrupt-media set, prepared once (in-process)."""
    root = tmp_path_factory.mktemp("corrupt")
    expected = media.make_corrupt_set(root / "src")
    manifest = prep.prepare(root / "src", root / "out", workers=0, shard_size=4, progress=False)
    samples = [s for e in manifest["shards"] for s in iter_shard(root / "out" / e["path"])]
    return root, expected, manifest, {s["meta"]["id"]: s for s in samples}


def _nearest_gap(t: float, fps: float, n: int) -> float:
    return min(abs(k / fps - t) for k in range(n))


def _spectrum_peak(x: np.ndarray, sr: int = SR) -> tuple[float, np.ndarray, np.ndarray]:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1 / sr)
    return float(freqs[spec.argmax()]), spec, freqs


# ----------------------------------------------------------------------------- corrupt media

def test_corrupt_set_exact_skip_report(corrupt):
    root, expected, manifest, samples = corrupt
    got = {Path(s["source"]).name: s["reason"] for s in manifest["skipped"]}
    assert got == {name: r for name, r in expected.items() if r is not None}
    assert all(s["reason"] in prep.REASONS and s["detail"] for s in manifest["skipped"])
    assert set(samples) == {Path(n).stem for n, r in expected.items() if r is None}
    assert manifest["num_samples"] == len(samples) == sum(e["count"] for e in manifest["shards"])
    assert manifest["complete"] is True
    assert json.loads((root / "out" / "skipped.json").read_text()) == manifest["skipped"]


def test_kept_clips_frames_are_the_nearest_source_frames(corrupt):
    _, _, _, samples = corrupt
    for clip_id, s in samples.items():
        meta = s["meta"]
        n_src = int(round(2.0 * 8))
        assert meta["num_frames"] == 16 and len(s["jpgs"]) == 16
        assert meta["frame_times"] == pytest.approx([i * min(meta["duration"], 10) / 16 for i in range(16)])
        for i, jpg in enumerate(s["jpgs"]):
            im = Image.open(io.BytesIO(jpg))
            assert im.mode == "RGB" and im.size == (224, 224), clip_id
            k = media.read_code(jpg)
            t = meta["frame_times"][i]
            assert abs(k / 8 - t) <= _nearest_gap(t, 8, n_src) + 1e-6, (clip_id, i, k)
            assert meta["frame_pts"][i] == pytest.approx(k / 8, abs=1e-3)


def test_kept_clips_audio_is_first_channel_16k_flac(corrupt):
    _, _, _, samples = corrupt
    for clip_id, s in samples.items():
        meta = s["meta"]
        info = sf.info(io.BytesIO(s["flac"]))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "FLAC")
        x, _ = sf.read(io.BytesIO(s["flac"]), dtype="float64")
        assert x.size == meta["num_samples"]
        assert abs(x.size - 2.0 * SR) <= 0.05 * SR, clip_id     # codec padding at most 50 ms
        assert meta["sample_rate"] == SR
        if clip_id == "silent":
            assert meta["silent"] is True and not x.any()
            continue
        assert meta["silent"] is False
        peak, spec, freqs = _spectrum_peak(x)
        assert abs(peak - 440) < 3, (clip_id, peak)
        # channel 1 of the stereo source is a 3 kHz tone: absent, so channel 0 was kept (no downmix)
        assert spec[np.abs(freqs - 3000) < 20].max() < 1e-2 * spec.max(), clip_id
    assert samples["rate44k_stereo"]["meta"]["source_sample_rate"] == 44100
    assert samples["rate8k"]["meta"]["source_sample_rate"] == 8000


def test_gray_source_stored_as_rgb(corrupt):
    _, _, _, samples = corrupt
    for jpg in samples["gray"]["jpgs"]:
        arr = np.asarray(Image.open(io.BytesIO(jpg)), np.int16)
        assert arr.shape == (224, 224, 3)
        assert np.abs(arr[..., 0] - arr[..., 1]).max() <= 4 and np.abs(arr[..., 1] - arr[..., 2]).max() <= 4
    colour = np.asarray(Image.open(io.BytesIO(samples["valid"]["jpgs"][1])), np.int16)  # frame 1: stripe 0 on
    assert colour[:10, 100:120, 0].mean() > 180 and colour[:10, 100:120, 1].mean() < 90


def test_silent_clip_fbank_at_floor_and_loader_keeps_it(corrupt):
    torch = pytest.importorskip("torch")
    fbank_mod = pytest.importorskip("tgdp.data.fbank")
    root, _, _, samples = corrupt
    x, _ = sf.read(io.BytesIO(samples["silent"]["flac"]), dtype="float32")
    fb = fbank_mod.fbank(torch.from_numpy(x))
    assert torch.isfinite(fb).all() and bool((fb == fbank_mod.LOG_FLOOR).all())
    loader = pytest.importorskip("tgdp.data.loader")
    ds = loader.ShardDataset(root / "out", mode="eval", img_size=32)
    items = {it["id"]: it for it in ds}
    assert set(items) == set(samples) and not ds.skipped
    a = items["silent"]["audio"]
    assert torch.isfinite(a).all()
    assert torch.allclose(a, torch.full_like(a, (fbank_mod.LOG_FLOOR + 5.081) / 4.4849))


# ----------------------------------------------------------------------------- sampling over 10 s

def test_long_clip_uses_first_10s_and_10_24s_of_audio(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    media.write_clip(src / "long.mkv", seconds=11.0, fps=5, size=(64, 56))
    m = prep.prepare(src, tmp_path / "out", workers=0, progress=False)
    (s,) = list(iter_shard(tmp_path / "out" / m["shards"][0]["path"]))
    assert s["meta"]["duration"] == pytest.approx(11.0)
    assert s["meta"]["frame_times"] == pytest.approx([i * 10 / 16 for i in range(16)])
    for i, jpg in enumerate(s["jpgs"]):
        k = media.read_code(jpg)
        assert abs(k / 5 - i * 0.625) <= _nearest_gap(i * 0.625, 5, 55) + 1e-6, (i, k)
    assert s["meta"]["num_samples"] == 163840
    x, _ = sf.read(io.BytesIO(s["flac"]))
    assert x.size == 163840


def test_click_lands_in_the_window_of_the_frame_at_that_time(tmp_path):
    """A click at the time of frame 8 (5.0 s of a 10 s clip, 44.1 kHz source): frame 8 is the source
    frame shown at 5.0 s, the stored audio has the click at 5.0 s, and frame 8's audio window (from the
    torch loader) has it at its centre row, while frame 3's window does not contain it."""
    torch = pytest.importorskip("torch")
    loader = pytest.importorskip("tgdp.data.loader")
    src = tmp_path / "src"
    src.mkdir()
    media.write_clip(src / "click.mkv", seconds=10.0, fps=8, size=(64, 56), audio="clicks",
                     clicks=[5.0], sample_rate=44100)
    m = prep.prepare(src, tmp_path / "out", workers=0, progress=False)
    (s,) = list(iter_shard(tmp_path / "out" / m["shards"][0]["path"]))
    assert media.read_code(s["jpgs"][8]) == 40                   # the frame at 5.0 s (8 fps)
    x, _ = sf.read(io.BytesIO(s["flac"]))
    assert abs(int(np.abs(x).argmax()) - 5.0 * SR) <= 16         # resampled click within 1 ms
    ds = loader.ShardDataset(tmp_path / "out", mode="retrieval", img_size=32)
    (item,) = list(ds)
    energy = item["audio"].mean(dim=-1)                           # [16, 416] per window row
    floor = energy.min()
    assert abs(int(energy[8].argmax()) - 208) <= 3                # the window centre
    assert float(energy[8].max() - floor) > 1.0
    assert float(energy[3].max() - floor) < 1e-3                  # 1.875 s: the click is out of reach
    assert torch.isfinite(item["audio"]).all()


# ----------------------------------------------------------------------------- resume, determinism

def _three_clips(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, hz in enumerate((300, 500, 700)):
        media.write_clip(root / f"c{i}.mkv", seconds=1.0, tone_hz=hz)
    return root


def test_resume_redoes_only_unfinished_shards(tmp_path, monkeypatch):
    src = _three_clips(tmp_path / "src")
    out = tmp_path / "out"
    first = prep.prepare(src, out, workers=0, shard_size=2, progress=False)
    assert [(e["path"], e["count"]) for e in first["shards"]] == [("shard-000000.tar", 2), ("shard-000001.tar", 1)]
    shard1 = (out / "shard-000001.tar").read_bytes()
    stat0 = os.stat(out / "shard-000000.tar")
    # an interrupted run: shard 1 never finished, a partial tmp file is left behind
    m = read_manifest(out)
    m["shards"], m["complete"] = m["shards"][:1], False
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.idx").unlink()
    (out / "shard-000001.tar.tmp").write_bytes(b"partial")
    calls = []
    real = prep.decode_clip
    monkeypatch.setattr(prep, "decode_clip", lambda item, **kw: calls.append(item.id) or real(item, **kw))
    again = prep.prepare(src, out, workers=0, shard_size=2, progress=False)
    assert calls == ["c2"]              # only shard 1's clip (sha1 order of c0, c1, c2: c0, c1, c2)
    assert os.stat(out / "shard-000000.tar").st_mtime_ns == stat0.st_mtime_ns
    assert (out / "shard-000001.tar").read_bytes() == shard1      # deterministic bytes
    assert not list(out.glob("*.tmp"))
    assert again["num_samples"] == 3 and again["complete"] is True
    with pytest.raises(ValueError, match="other inputs or settings"):
        prep.prepare(src, out, workers=0, shard_size=3, progress=False)


def test_parallel_workers_give_identical_shards(tmp_path):
    src = _three_clips(tmp_path / "src")
    prep.prepare(src, tmp_path / "a", workers=0, shard_size=2, progress=False)
    prep.prepare(src, tmp_path / "b", workers=2, shard_size=2, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000000.idx", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def _fake_decode(item, **kw):
    """Stands in for decode_clip (1 frame): the shard assignment is tested without decoding video."""
    return {"id": item.id, "labels": list(item.labels), "num_frames": 1}, b"flac", [b"jpg"]


def _write_list(path: Path, ids: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "labels"])
        w.writerows([(f"v/{i}.mkv", i, i.split("_")[0]) for i in ids])
    return path


def test_shards_mix_classes_of_a_class_sorted_list(tmp_path, monkeypatch):
    """4 classes x 8 clips listed class by class (id order would give one class per shard): every
    one of the 4 shards holds >= 3 classes, the assignment is the sha1-of-id order (independent
    re-implementation), a reversed list gives byte-identical shards, and a resume with one clip
    fewer is refused."""
    monkeypatch.setattr(prep, "decode_clip", _fake_decode)
    ids = [f"{c}_{i:02d}" for c in ("cat", "dog", "owl", "pig") for i in range(8)]
    kw = dict(workers=0, shard_size=8, num_frames=1, progress=False)
    m = prep.prepare(_write_list(tmp_path / "sorted.csv", ids), tmp_path / "a", **kw)
    shards = [[s["meta"] for s in iter_shard(tmp_path / "a" / e["path"])] for e in m["shards"]]
    assert [len(s) for s in shards] == [8] * 4 and m["num_samples"] == 32
    ref = sorted(ids, key=lambda i: hashlib.sha1(i.encode("utf-8")).hexdigest())
    assert [meta["id"] for s in shards for meta in s] == ref
    classes = [{meta["labels"][0] for meta in s} for s in shards]
    assert all(len(c) >= 3 for c in classes), classes
    prep.prepare(_write_list(tmp_path / "reversed.csv", ids[::-1]), tmp_path / "b", **kw)
    for e in m["shards"]:
        for name in (e["path"], e["path"].replace(".tar", ".idx")):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="other inputs or settings"):
        prep.prepare(_write_list(tmp_path / "fewer.csv", ids[1:]), tmp_path / "a", **kw)


# ----------------------------------------------------------------------------- DALI index

@pytest.fixture(scope="module")
def small_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    src = _three_clips(root / "src")
    m = prep.prepare(src, root / "out", workers=0, progress=False)
    return root / "out" / m["shards"][0]["path"]


def test_index_matches_wds2idx_and_offsets(small_shard):
    idx = small_shard.with_suffix(".idx")
    data = small_shard.read_bytes()
    samples = list(iter_shard(small_shard))
    entries = read_index(idx)
    assert len(entries) == len(samples) == 3
    for sample, fields in zip(samples, entries):
        assert [f[0] for f in fields] == member_exts(16)
        payloads = [json.dumps(sample["meta"]).encode(), sample["flac"], *sample["jpgs"]]
        for (ext, off, size, name), payload in zip(fields, payloads):
            assert name == f"{sample['key']}.{ext}" and data[off:off + size] == payload
    wds2idx = pytest.importorskip("wds2idx")
    ref = small_shard.parent / "ref.idx"
    with wds2idx.IndexCreator(str(small_shard), str(ref), verbose=False) as ic:
        ic.create_index()
    assert ref.read_text() == idx.read_text()


def test_dali_reads_shard_with_index(small_shard):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    exts = member_exts(16)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(paths=[str(small_shard)], index_paths=[str(small_shard.with_suffix(".idx"))],
                                           ext=exts, missing_component_behavior="error", name="r"))

    p = pipe()
    p.build()
    assert p.reader_meta("r")["epoch_size"] == 3
    outs = p.run()
    for b, sample in enumerate(iter_shard(small_shard)):
        got = [bytes(np.asarray(o[b])) for o in outs]
        assert json.loads(got[0]) == sample["meta"]
        assert got[1] == sample["flac"] and got[2:] == sample["jpgs"]


# ----------------------------------------------------------------------------- inputs and validation

def test_csv_and_json_lists(tmp_path):
    src = _three_clips(tmp_path / "v")
    (tmp_path / "list.csv").write_text("path,id,labels\nv/c1.mkv,b.clip,dog;cat\nv/c0.mkv,a,\n")
    items = prep.list_inputs(tmp_path / "list.csv")
    # shard order: sha1 of the id ("b.clip" 2f70..., "a" 86f7...), not the listing or id order
    assert [(Path(i.source).name, i.id, i.labels) for i in items] == [("c1.mkv", "b.clip", ("dog", "cat")),
                                                                       ("c0.mkv", "a", ())]
    (tmp_path / "list.json").write_text(json.dumps({"data": [
        {"path": str(src / "c2.mkv"), "video_id": "x", "labels": "/m/1,/m/2"},
        {"path": "v/c0.mkv", "id": "x", "labels": ["l"]}]}))
    m = prep.prepare(tmp_path / "list.json", tmp_path / "out", workers=0, progress=False)
    assert m["num_samples"] == 1
    assert [(s["id"], s["reason"]) for s in m["skipped"]] == [("x", "duplicate_id")]
    (s,) = list(iter_shard(tmp_path / "out" / m["shards"][0]["path"]))
    assert s["meta"]["labels"] == ["l"] and s["meta"]["source"] == str((src / "c0.mkv").resolve())
    (tmp_path / "bad.csv").write_text("file,id\nx.mp4,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        prep.list_inputs(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="must be a folder"):
        prep.list_inputs(tmp_path / "missing")
    with pytest.raises(ValueError, match="shard_size"):
        prep.prepare(src, tmp_path / "o2", shard_size=0)


def test_sanitize_key():
    assert sanitize_key("glLQrEijrKg_000300") == "glLQrEijrKg_000300"
    keys = {sanitize_key(s) for s in ("a.b", "a/b", "a b", "a_b", "x" * 200)}
    assert len(keys) == 5
    for k in keys:
        assert len(k) <= 64 and all(c.isalnum() or c in "_-" for c in k)
    with pytest.raises(ValueError):
        sanitize_key("")


def test_shard_writer_rejects_bad_samples(tmp_path):
    w = ShardWriter(tmp_path / "s.tar", num_frames=2)
    with pytest.raises(ValueError, match="expected 2"):
        w.write("k", {"num_frames": 2}, b"f", [b"j"])
    with pytest.raises(ValueError, match="not sanitised"):
        w.write("a.b", {"num_frames": 2}, b"f", [b"j", b"j"])
    w.write("k", {"num_frames": 2}, b"f", [b"j", b"j"])
    with pytest.raises(ValueError, match="duplicate key"):
        w.write("k", {"num_frames": 2}, b"f", [b"j", b"j"])
    assert not (tmp_path / "s.tar").exists()                      # nothing final before close
    assert w.close() == 1 and (tmp_path / "s.tar").exists() and (tmp_path / "s.idx").exists()
    with ShardWriter(tmp_path / "empty.tar") as e:
        pass
    assert e.count == 0 and not (tmp_path / "empty.tar").exists()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "aborted.tar", num_frames=2) as a:
        a.write("k", {"num_frames": 2}, b"f", [b"j", b"j"])
        raise RuntimeError("boom")
    assert not list(tmp_path.glob("aborted*"))


def test_iter_shard_rejects_incomplete_sample(tmp_path):
    import tarfile
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in (("k.json", json.dumps({"num_frames": 2}).encode()), ("k.flac", b"f"),
                           ("k.f00.jpg", b"j")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="has members"):
        list(iter_shard(tmp_path / "bad.tar"))


def test_cli_main(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    media.write_clip(src / "a.mkv", seconds=1.0)
    (src / "empty.mp4").write_bytes(b"")
    (src / "notes.txt").write_text("not a video")
    assert prep.main(["--src", str(src), "--out", str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 clips in 1 shards" in out and "zero_length" in out
