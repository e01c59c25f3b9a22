"""tgdp.data.loader: the plain-PyTorch shard loader (modes, splits, seeds, corrupt samples).

Expected tensors are rebuilt independently: audio from the float64 Kaldi reference + the spec's
window formula, frames from numpy on the PIL-decoded JPEG.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kaldi_reference import kaldi_fbank
from tgdp.configs import DataConfig, apply_overrides, tiny
from tgdp.data.loader import Batch, ShardDataset, TorchLoader, make_loader, sample_generator
from tgdp.data.shards import ShardWriter, new_manifest, write_manifest

SR, K, S = 16000, 16, 32
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- shard helpers (shared with test_dali)

def jpeg(seed: int, size: int = S, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[: size // 2] //= 2  # some structure so JPEG is not pure noise
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode != "RGB" else im
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def flac(wave: np.ndarray, sr: int = SR) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def tone(seconds: float, hz: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))


def meta(key: str, n: int, labels=("a",)) -> dict:
    dur = n / SR
    return {"id": key, "labels": list(labels), "duration": dur, "fps": 8.0, "num_frames": K,
            "frame_times": [i * min(dur, 10.0) / K for i in range(K)], "sample_rate": SR, "num_samples": n,
            "silent": False, "source": f"{key}.mkv"}


def good_sample(i: int, seconds: float = 1.5, img: int = S):
    key = f"clip{i:03d}"
    wave = tone(seconds, 200 + 37 * i, seed=i)
    return key, meta(key, len(wave), (f"l{i % 3}",)), flac(wave), [jpeg(1000 * i + f, img) for f in range(K)]


def write_dataset(root: Path, counts: list[int], seconds: float = 1.5, img: int = S, start: int = 0) -> list[str]:
    """Good samples in ``len(counts)`` shards (with DALI indexes) + manifest; returns the ids."""
    root.mkdir(parents=True, exist_ok=True)
    m = new_manifest(img_size=img)
    ids, i = [], start
    for s, c in enumerate(counts):
        name = f"shard-{s:06d}.tar"
        with ShardWriter(root / name) as w:
            for _ in range(c):
                key, md, fl, jp = good_sample(i, seconds, img)
                w.write(key, md, fl, jp)
                ids.append(key)
                i += 1
        m["shards"].append({"path": name, "count": c})
    write_manifest(root, m)
    return ids


def write_raw_shard(root: Path, name: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A shard written member by member, so it can hold what ShardWriter refuses (corrupt samples)."""
    with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def parts_of(key, md, fl, jp) -> dict[str, bytes]:
    return {"json": json.dumps(md).encode(), "flac": fl, **{f"f{i:02d}.jpg": j for i, j in enumerate(jp)}}


def expected_audio(wave_f32: np.ndarray, t: float, data=DataConfig()) -> np.ndarray:
    """Spec §5.2 by hand on the float64 reference fbank."""
    fb = kaldi_fbank(wave_f32.astype(np.float64))
    floor = np.log(np.float32(np.finfo(np.float32).eps))
    full = np.full((1024, 128), floor if data.pad == "floor" else 0.0)
    full[: min(len(fb), 1024)] = fb[:1024]
    start = min(max(int(round(t * 100)) - 208, 0), 1024 - 416)
    return (full[start: start + 416] + 5.081) / 4.4849


def expected_frame(jpg: bytes) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), np.float64) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def decoded(fl: bytes) -> np.ndarray:
    import soundfile as sf

    return sf.read(io.BytesIO(fl), dtype="float32")[0]


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def ds_root(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    return root, write_dataset(root, [3, 3, 2])


def test_eval_batch_matches_hand_computation(ds_root):
    root, ids = ds_root
    ds = ShardDataset(root, "eval", img_size=S)
    items = list(ds)
    assert [it["id"] for it in items] == ids
    for n, it in enumerate(items[:2]):
        key, md, fl, jp = good_sample(n)
        assert it["frame_idx"].tolist() == [8]
        assert it["labels"] == md["labels"]
        assert it["audio"].shape == (1, 416, 128) and it["frames"].shape == (1, 3, S, S)
        want = expected_audio(decoded(fl), md["frame_times"][8])
        assert np.abs(it["audio"][0].double().numpy() - want).max() < 1e-3 / 4.4849 + 1e-6
        assert np.abs(it["frames"][0].double().numpy() - expected_frame(jp[8])).max() < 1e-5


def test_loader_batches_and_resize(ds_root):
    root, ids = ds_root
    ld = TorchLoader(ShardDataset(root, "eval", img_size=24), batch_size=3)
    batches = list(ld)
    assert [len(b) for b in batches] == [3, 3, 2]
    b = batches[0]
    assert isinstance(b, Batch) and b.audio.shape == (3, 416, 128) and b.frames.shape == (3, 3, 24, 24)
    assert b.audio.dtype == torch.float32 and b.frame_idx.dtype == torch.long
    assert sum((bb.ids for bb in batches), []) == ids and not ld.skipped
    # bicubic short-side resize + centre crop by hand with PIL
    from PIL import Image

    im = Image.open(io.BytesIO(good_sample(0)[3][8])).convert("RGB").resize((24, 24), Image.BICUBIC)
    want = ((np.asarray(im, np.float64) / 255 - MEAN) / STD).transpose(2, 0, 1)
    assert np.abs(b.frames[0].double().numpy() - want).max() < 1e-5


def test_retrieval_yields_all_frames(ds_root):
    root, ids = ds_root
    b = next(iter(TorchLoader(ShardDataset(root, "retrieval", img_size=S), batch_size=2)))
    assert b.audio.shape == (32, 416, 128) and b.frames.shape == (32, 3, S, S)
    assert b.frame_idx.tolist() == list(range(K)) * 2 and b.ids == ids[:2] and len(b) == 2
    assert b.labels == [good_sample(0)[1]["labels"], good_sample(1)[1]["labels"]]
    key, md, fl, jp = good_sample(1)
    for f in (0, 9, 15):
        want = expected_audio(decoded(fl), md["frame_times"][f])
        assert np.abs(b.audio[K + f].double().numpy() - want).max() < 1e-3
        assert np.abs(b.frames[K + f].double().numpy() - expected_frame(jp[f])).max() < 1e-5


def _train_pairs(root, seed, epoch, workers=0, world=1):
    pairs = []
    for rank in range(world):
        ds = ShardDataset(root, "train", data=DataConfig(shuffle_buffer=4), img_size=S, seed=seed, rank=rank,
                          world_size=world)
        ld = TorchLoader(ds, batch_size=1, num_workers=workers)
        ld.set_epoch(epoch)
        pairs += [(i, int(f)) for b in ld for i, f in zip(b.ids, b.frame_idx)]
    return pairs


def test_train_frames_seeded_per_sample_and_epoch(ds_root):
    root, ids = ds_root
    a = _train_pairs(root, seed=1, epoch=0)
    assert sorted(i for i, _ in a) == ids
    assert a == _train_pairs(root, seed=1, epoch=0)  # reproducible, order included
    assert [i for i, _ in a] != ids  # shuffled
    want = {i: int(torch.randint(K, (1,), generator=sample_generator(1, 0, i))) for i in ids}
    assert dict(a) == want
    # independent of worker count and world size; a new epoch / seed draws new frames
    assert dict(_train_pairs(root, seed=1, epoch=0, workers=1, world=2)) == want
    assert dict(_train_pairs(root, seed=1, epoch=1)) != want
    assert dict(_train_pairs(root, seed=2, epoch=0)) != want


@pytest.mark.parametrize("world, workers", [(2, 0), (2, 2)])
def test_rank_and_worker_split_is_a_partition(ds_root, world, workers):
    root, ids = ds_root
    seen = []
    for rank in range(world):
        ds = ShardDataset(root, "eval", img_size=S, rank=rank, world_size=world)
        seen += [i for b in TorchLoader(ds, 2, num_workers=workers) for i in b.ids]
    assert sorted(seen) == ids  # every sample exactly once (3 shards < 6 workers: sample-level split)


def test_time_shift_rolls_the_window(ds_root):
    root, ids = ds_root
    data = DataConfig(time_shift=0.2, shuffle_buffer=1)  # shifts in {-83 .. 83} (floor(0.2 * 416))
    shifted = {it["id"]: it for it in ShardDataset(root, "train", data=data, img_size=S, seed=4)}
    for i in ids[:3]:
        f = int(torch.randint(K, (1,), generator=sample_generator(4, 0, i)))
        sh = int(torch.randint(-83, 84, (1,), generator=sample_generator(4, 0, i, "shift")))
        assert int(shifted[i]["frame_idx"]) == f
        ref = next(it for it in ShardDataset(root, "eval", img_size=S, frame=f) if it["id"] == i)["audio"][0]
        assert torch.equal(shifted[i]["audio"][0], torch.roll(ref, sh, 0))


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    import soundfile as sf  # noqa: F401  (decoder present)

    k0, m0, f0, j0 = good_sample(0)
    silent = np.zeros(SR, np.float64)
    ks, ms = "silent", meta("silent", SR)
    samples = [
        (k0, parts_of(k0, m0, f0, j0)),
        ("nojpg", {k: v for k, v in parts_of("nojpg", meta("nojpg", 24000), f0, j0).items() if k != "f08.jpg"}),
        ("badjpg", parts_of("badjpg", meta("badjpg", 24000), f0, [j0[0][:200]] * K)),
        ("badflac", parts_of("badflac", meta("badflac", 24000), b"fLaC" + b"\0" * 100, j0)),
        ("sr8k", parts_of("sr8k", meta("sr8k", 12000), flac(tone(1.5, 300)[:12000], 8000), j0)),
        ("badjson", {**parts_of("badjson", m0, f0, j0), "json": b"{not json"}),
        ("gray", parts_of("gray", meta("gray", 24000), f0, [jpeg(5, S, "L")] * K)),
        ("cmyk", parts_of("cmyk", meta("cmyk", 24000), f0, [jpeg(6, S, "CMYK")] * K)),
        (ks, parts_of(ks, ms, flac(silent), j0)),
    ]
    write_raw_shard(tmp_path, "shard-000000.tar", samples)
    m = new_manifest(img_size=S)
    m["shards"] = [{"path": "shard-000000.tar", "count": len(samples)}]
    write_manifest(tmp_path, m)
    ld = TorchLoader(ShardDataset(tmp_path, "eval", img_size=S), batch_size=2, num_workers=1)
    batches = list(ld)
    got = sum((b.ids for b in batches), [])
    assert got == [k0, "gray", "cmyk", "silent"]
    assert dict(ld.skipped) == {"missing member": 1, "bad image": 1, "bad audio": 1, "wrong sample rate": 1,
                                "bad metadata": 1}
    out = {i: (b.audio[j], b.frames[j]) for b in batches for j, i in enumerate(b.ids)}
    floor = (np.log(np.finfo(np.float32).eps) + 5.081) / 4.4849
    assert torch.isfinite(out["silent"][0]).all() and torch.allclose(out["silent"][0], torch.full((416, 128), floor))
    from PIL import Image

    gray = np.asarray(Image.open(io.BytesIO(jpeg(5, S, "L"))).convert("RGB"), np.float64) / 255
    assert np.abs(out["gray"][1].double().numpy() - ((gray - MEAN) / STD).transpose(2, 0, 1)).max() < 1e-5
    assert out["cmyk"][1].shape == (3, S, S)


def test_truncated_shard_is_counted_not_fatal(tmp_path):
    write_dataset(tmp_path, [3, 2])
    tar = tmp_path / "shard-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])  # cut inside the third sample
    ld = TorchLoader(ShardDataset(tmp_path, "eval", img_size=S), batch_size=8)
    ids = [i for b in ld for i in b.ids]
    assert ids == ["clip000", "clip001", "clip003", "clip004"]
    assert dict(ld.skipped) == {"bad shard": 1}


def test_make_loader_picks_torch_and_sizes(ds_root, tmp_path):
    root, ids = ds_root
    cfg = apply_overrides(tiny(), {"data.loader": "torch", "data.num_workers": 0, "model.img_size": 32,
                                   "train.batch_size": 4})
    ld = make_loader(cfg, "train", rank=0, world_size=2, root=str(root))
    assert ld.backend == "torch"
    assert all(len(b) == 2 for b in ld)  # 4 // world_size, last partial batch dropped in train
    auto = make_loader(apply_overrides(cfg, {"data.loader": "auto"}), "eval", root=str(root))
    assert auto.backend == ("dali" if torch.cuda.is_available() else "torch")
    with pytest.raises(ValueError, match="mode"):
        make_loader(cfg, "test", root=str(root))
    # no data.root: the demo set's split folders (<demo_dir>/train, <demo_dir>/val)
    demo = tmp_path / "demo"
    write_dataset(demo / "val", [2], start=50)
    ev = make_loader(apply_overrides(cfg, {"data.demo_dir": str(demo)}), "retrieval", batch_size=2)
    assert [b.ids for b in ev] == [["clip050", "clip051"]]
    with pytest.raises(ValueError, match="manifest"):
        make_loader(cfg, "eval", root=str(root / "nowhere"))


def test_dataset_argument_errors(ds_root):
    root, _ = ds_root
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(root, "eval", rank=2, world_size=2)
    with pytest.raises(ValueError, match="frame"):
        ShardDataset(root, "eval", frame=16)


def test_package_exports_are_lazy():
    # prepare/demo workers import only shards/clip_decode: they must not pay for importing torch
    import os
    import subprocess
    import sys

    code = ("import sys, tgdp.data.shards, tgdp.data.clip_decode\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "from tgdp.data import fbank, make_loader, read_manifest, window_starts, synthetic\n"
            "import tgdp.data, tgdp.data.fbank as fb_mod\n"
            "from tgdp.data.fbank import fbank as f2\n"
            "assert fbank is f2 is tgdp.data.fbank and callable(fbank), fbank  # the function, not the module\n"
            "assert make_loader.__module__ == 'tgdp.data.loader' and synthetic.__name__ == 'tgdp.data.synthetic'\n"
            "assert sorted(tgdp.data.__all__) == sorted(n for n in tgdp.data.__all__ if hasattr(tgdp.data, n))\n"
            "try:\n    tgdp.data.nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
