"""tgdp.data.synthetic: the embedded demo set.

The generator is checked on its raw output (frames and audio before encoding) for the
audio-visual ties that make it learnable — sound only while the object is visible, pitch following
height, every clip of a class told apart by a hand-made matcher — and end to end at a tiny size
through prepare into shards (labels, pitch per class, caching by stamp).
"""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import soundfile as sf

from tgdp.data import synthetic as syn
from tgdp.data.shards import iter_shard, read_manifest

FPS, SR = syn.FPS, syn.SAMPLE_RATE


def _object_mask(frames: np.ndarray, cls: int) -> np.ndarray:
    """``[T, S, S]`` pixels of the class colour at full or pulse-dimmed brightness."""
    colour = np.asarray(syn.CLASSES[cls][1], np.float64)
    f = frames.astype(np.float64)
    levels = (syn.brightness(1.0), syn.brightness(syn.PULSE_LOW))
    return np.stack([np.abs(f - colour * b).max(-1) <= 2 for b in levels]).any(0)


def _pitch(audio: np.ndarray, t: float, half: float = 0.05) -> float:
    """Frequency (Hz) at time ``t`` from the zero crossings of a ``2 * half`` s window (pure sine)."""
    x = audio[int((t - half) * SR):int((t + half) * SR)]
    crossings = np.flatnonzero(np.diff(np.signbit(x).astype(np.int8)) != 0)
    return (crossings.size - 1) / 2 / ((crossings[-1] - crossings[0]) / SR)


def _features(cls: int, seed: int):
    """Per video frame time: visible (from pixels), object row (pixels); audible, pitch (audio)."""
    frames, audio = syn.render_clip(cls, seed)
    mask = _object_mask(frames, cls)
    visible = mask.sum((1, 2)) >= 20
    rows = np.array([np.nonzero(m)[0].mean() if v else np.nan for m, v in zip(mask, visible)])
    times = np.arange(frames.shape[0]) / FPS
    rms = np.array([np.sqrt(np.mean(audio[max(int((t - 0.02) * SR), 0):int((t + 0.02) * SR)] ** 2)) for t in times])
    return frames, audio, visible, rows, rms, times


def test_sound_only_while_object_visible_and_pitch_follows_height():
    frames, audio, visible, rows, rms, times = _features(0, seed=3)   # red disc, sine, steady
    assert frames.shape == (80, syn.SIZE, syn.SIZE, 3) and frames.dtype == np.uint8
    assert audio.shape == (int(syn.SECONDS * SR),) and np.abs(audio).max() <= 1
    assert 0.2 < visible.mean() < 0.95                                  # silent stretches exist
    clear = np.array([visible[max(k - 1, 0):k + 2].all() or not visible[max(k - 1, 0):k + 2].any()
                      for k in range(len(visible))])                    # away from on/off edges
    assert (rms[clear & visible] > 0.01).all()
    assert (rms[clear & ~visible] == 0).all()
    keep = clear & visible & (times > 0.1) & (times < syn.SECONDS - 0.1)
    pitch = np.array([_pitch(audio, t) for t in times[keep]])
    # rows grow downwards, pitch rises upwards: f = f0 * 2^((0.5 - y) * 8 / 12), y = row / SIZE
    expected = syn.CLASSES[0][3] * 2 ** ((0.5 - rows[keep] / syn.SIZE) * 8 / 12)
    assert np.corrcoef(pitch, rows[keep])[0, 1] < -0.95
    assert np.abs(np.log2(pitch / expected)).max() < 0.5 / 12           # within half a semitone


def test_clips_of_one_class_are_told_apart_by_a_simple_matcher():
    """Video i must match audio i best: visibility and height-vs-pitch tracks agree only for the
    same clip, so within-class retrieval is possible."""
    feats = [_features(0, seed=100 + i) for i in range(6)]
    f0 = syn.CLASSES[0][3]
    dist = np.zeros((6, 6))
    for i, (_, _, vis_i, rows_i, _, _) in enumerate(feats):
        for j, (_, audio_j, _, _, rms_j, times) in enumerate(feats):
            audible = rms_j > 0.01
            d = np.mean(vis_i != audible)
            both = vis_i & audible & (times > 0.1) & (times < syn.SECONDS - 0.1)
            if both.any():
                pitch = np.array([_pitch(audio_j, t) for t in times[both]])
                y_from_audio = 0.5 - np.log2(pitch / f0) * 12 / 8
                d += np.mean(np.abs(y_from_audio - rows_i[both] / syn.SIZE))
            else:
                d += 1.0
            dist[i, j] = d
    assert (dist.argmin(axis=1) == np.arange(6)).all(), dist


def test_render_is_deterministic_and_checks_class():
    a = syn.render_clip(4, seed=7)
    b = syn.render_clip(4, seed=7)
    c = syn.render_clip(4, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.allclose(a[1], c[1])
    with pytest.raises(ValueError, match="class index"):
        syn.render_clip(len(syn.CLASSES), seed=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    syn.ensure_demo(out, n_train=3, n_val=2, workers=0, progress=False)
    return out


def test_demo_end_to_end_through_prepare(demo):
    stamp = json.loads((demo / "stamp.json").read_text())
    assert stamp["n_train"] == 3 and stamp["n_val"] == 2
    assert not (demo / "videos").exists()                               # sources deleted
    for split, n in (("train", 3), ("val", 2)):
        m = read_manifest(demo / split)
        assert m["num_samples"] == n and m["skipped"] == [] and m["complete"]
        samples = [s for e in m["shards"] for s in iter_shard(demo / split / e["path"])]
        ids = [f"{split}_{i:05d}" for i in range(n)]     # shard order: sha1 of the id (tgdp.prepare)
        assert [s["meta"]["id"] for s in samples] == sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
        for s in samples:
            i = int(s["meta"]["id"].rsplit("_", 1)[1])
            name, _, _, f0, _, _ = syn.CLASSES[i % len(syn.CLASSES)]
            assert s["meta"]["labels"] == [name]
            assert s["meta"]["duration"] == pytest.approx(10.0) and s["meta"]["fps"] == 8
            assert len(s["jpgs"]) == 16
            x, sr = sf.read(io.BytesIO(s["flac"]))
            assert sr == SR and x.size == 160000
            spec = np.abs(np.fft.rfft(x))
            peak = np.fft.rfftfreq(x.size, 1 / sr)[spec.argmax()]
            assert abs(12 * np.log2(peak / f0)) <= 2.5, (name, peak)    # pitch range: +-2 semitones


def test_demo_is_cached_and_rebuilt_on_new_settings(demo, monkeypatch):
    manifest = demo / "train" / "manifest.json"
    before = os.stat(manifest).st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("prepare must not run for a cached demo set")

    import tgdp.prepare
    monkeypatch.setattr(tgdp.prepare, "prepare", boom)
    assert syn.ensure_demo(demo, n_train=3, n_val=2, workers=0, progress=False) == demo
    assert os.stat(manifest).st_mtime_ns == before
    monkeypatch.undo()
    syn.ensure_demo(demo, n_train=2, n_val=1, workers=0, progress=False)
    assert read_manifest(demo / "train")["num_samples"] == 2
    assert json.loads((demo / "stamp.json").read_text())["n_train"] == 2


def test_demo_refuses_foreign_folder_and_bad_sizes(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no stamp.json"):
        syn.ensure_demo(tmp_path, n_train=1, n_val=1, workers=0, progress=False)
    with pytest.raises(ValueError, match="n_val"):
        syn.ensure_demo(tmp_path / "x", n_train=1, n_val=0)


# Recorded from the generator as it made the main job's demo set (commit f44871b): the README's
# figures were measured on exactly these clips, so the default corpus must not change.
_DEFAULT_RENDER_SHA256 = {
    (0, 0): "1a4d41e8be5d71dd4aa630e63e9d3a1297af8d43c7556d28f1ebaf64f7b34ef5",
    (7, 397): "773b084aa80396601263b4ffcee22e893661c7df6709ecb90adb3dd4bf3de563",
    (3, 1_000_063): "4e6c50afd086ced91a4c6926849f61d3ea3afc6b22044fe4bc6270e83988d075",
}


def test_default_demo_corpus_is_unchanged():
    plan = syn.demo_plan()
    # the plan the demo set was generated from: class i mod 10, seed 0 * 10_000_019 + offset + i
    assert plan == {"train": [(f"train_{i:05d}", i % 10, i) for i in range(400)],
                    "val": [(f"val_{i:05d}", i % 10, 1_000_000 + i) for i in range(64)]}
    assert plan == syn.demo_plan(400, 64, 0, len(syn.CLASSES))
    for (cls, seed), digest in _DEFAULT_RENDER_SHA256.items():
        assert (cls, seed) in {c[1:] for split in plan.values() for c in split}
        frames, audio = syn.render_clip(cls, seed)
        assert hashlib.sha256(frames.tobytes() + audio.tobytes()).hexdigest() == digest, (cls, seed)


def test_seed_and_class_count_draw_another_corpus():
    base = syn.demo_plan(20, 30)
    other = syn.demo_plan(20, 30, seed=3, n_classes=4)
    assert [c[1] for c in other["train"]] == [i % 4 for i in range(20)]
    assert [c[1] for c in other["val"]] == [i % 4 for i in range(30)]
    seeds = lambda p: {c[2] for split in p.values() for c in split}   # noqa: E731
    assert not seeds(base) & seeds(other)                               # no clip shared
    # a larger held-out split only appends clips: the demo's 64 val clips open the 1,000-clip one
    assert syn.demo_plan(400, 1000)["val"][:64] == syn.demo_plan()["val"]
    for bad, match in (({"n_classes": 0}, "n_classes"), ({"n_classes": 11}, "n_classes"),
                       ({"seed": -1}, "seed"), ({"n_classes": 2.0}, "n_classes")):
        with pytest.raises(ValueError, match=match):
            syn.demo_plan(**bad)


def test_demo_with_seed_and_class_count(tmp_path):
    out = syn.ensure_demo(tmp_path / "d", n_train=3, n_val=2, seed=2, n_classes=2, workers=0, progress=False)
    stamp = json.loads((out / "stamp.json").read_text())
    assert stamp["seed"] == 2 and stamp["classes"] == [syn.CLASSES[0][0], syn.CLASSES[1][0]]
    m = read_manifest(out / "train")
    labels = {s["meta"]["id"]: s["meta"]["labels"] for e in m["shards"] for s in iter_shard(out / "train" / e["path"])}
    assert labels == {f"train_{i:05d}": [syn.CLASSES[i % 2][0]] for i in range(3)}


def test_cli_takes_seed_and_class_count():
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        syn.main(["--help"])
    assert "--classes" in buf.getvalue() and "--seed" in buf.getvalue()
