"""Data loading throughput: the DALI pipeline vs the plain-PyTorch loader (opt-in benchmark).

    pytest benchmarks/bench_data.py                    # pytest-benchmark table, samples/s in extra_info
    python benchmarks/bench_data.py [N] [THREADS]      # side-by-side ratio print-out

Both paths read the same shards with the same parallelism (DALI ``num_threads`` = DataLoader
``num_workers`` = THREADS, default 2) and produce the same Batch (train mode, one random frame per
clip, 416x128 normalised audio window, 224x224 frames). Shards: ``$TGDP_BENCH_ROOT`` if set (e.g. the
demo set's ``train`` folder), else N (default 48) synthetic 10 s clips with 224x224 JPEGs written to
a temporary folder. On a GPU machine DALI decodes JPEGs with nvJPEG and the fbank runs on the GPU;
on CPU both paths use the CPU, and the "dali" provider runs the torch fbank serially in the main
process while the torch loader runs it in its workers; "dali_mel" (DALI's own, not Kaldi-exact
log-Mel) shows DALI without that. Timings on a shared CPU are noisy: compare the providers only
within one run (the print-out interleaves them). Each timed epoch includes the per-epoch set-up of
either path (DataLoader worker start; DALI's plan, index files and pipeline build).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tgdp.configs import DataConfig
from tgdp.data.loader import ShardDataset, TorchLoader
from tgdp.data.shards import ShardWriter, new_manifest, write_manifest

BATCH, SR, K, IMG = 16, 16000, 16, 224
# dali_mel: DALI with its own (not Kaldi-exact) log-Mel, i.e. without the torch fbank that the
# "dali" provider runs in the main process (serial on CPU; on the GPU when there is one).
PROVIDERS = ("torch", "dali", "dali_mel")


def _jpeg(rng, img: int = IMG) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:img, 0:img]
    base = np.stack([(x + rng.integers(255)) % 256, (y + rng.integers(255)) % 256, (x + y) // 2 % 256], -1)
    arr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)  # photo-like JPEG size
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _flac(rng, seconds: float = 10.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_shards(root: Path, n: int, per_shard: int = 16) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    m = new_manifest(img_size=IMG)
    for s in range(0, n, per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        count = min(per_shard, n - s)
        with ShardWriter(root / name) as w:
            for i in range(s, s + count):
                key = f"bench{i:05d}"
                meta = {"id": key, "labels": ["x"], "duration": 10.0, "fps": 25.0, "num_frames": K,
                        "frame_times": [f * 10.0 / K for f in range(K)], "sample_rate": SR,
                        "num_samples": 10 * SR, "silent": False, "source": key}
                w.write(key, meta, _flac(rng), [_jpeg(rng) for _ in range(K)])
        m["shards"].append({"path": name, "count": count})
    write_manifest(root, m)
    return root


def _loader(provider: str, root: Path, threads: int):
    data = DataConfig(shuffle_buffer=64)
    if provider == "torch":
        ds = ShardDataset(root, "train", data=data, img_size=IMG, seed=0)
        return TorchLoader(ds, BATCH, num_workers=threads, drop_last=True)
    from tgdp.data.dali import DaliLoader
    return DaliLoader(root, "train", data=data, img_size=IMG, batch_size=BATCH, seed=0, num_threads=threads,
                      mel="dali" if provider == "dali_mel" else "torch")


def _epoch(loader) -> int:
    n = 0
    for b in loader:
        n += b.audio.shape[0]
    return n


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    env = os.environ.get("TGDP_BENCH_ROOT")
    return Path(env) if env else make_shards(tmp_path_factory.mktemp("bench_data"), 48)


@pytest.mark.parametrize("threads", [2])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_data_throughput(benchmark, shard_root, provider, threads):
    if provider != "torch":
        pytest.importorskip("nvidia.dali")
    loader = _loader(provider, shard_root, threads)
    _epoch(loader)  # warm-up: worker start, DALI pipeline build, page cache
    n = benchmark.pedantic(_epoch, args=(loader,), rounds=3, iterations=1)
    benchmark.group = f"data train epoch, threads={threads}"
    benchmark.extra_info.update(samples=n, samples_per_s=n / benchmark.stats.stats.mean)


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 48
    threads = int(argv[1]) if len(argv) > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(os.environ["TGDP_BENCH_ROOT"]) if "TGDP_BENCH_ROOT" in os.environ else make_shards(Path(tmp), n)
        loaders = {p: _loader(p, root, threads) for p in PROVIDERS}
        for ld in loaders.values():
            _epoch(ld)
        best = {p: float("inf") for p in loaders}
        samples = {}
        for _ in range(3):  # interleaved, so a burst of load on the shared CPU hits both
            for p, ld in loaders.items():
                t = time.perf_counter()
                samples[p] = _epoch(ld)
                best[p] = min(best[p], time.perf_counter() - t)
        rate = {p: samples[p] / best[p] for p in loaders}
        for p in loaders:
            print(f"{p:8s} {rate[p]:8.1f} samples/s ({samples[p]} samples, best of 3 epochs, {threads} threads)")
        for p in PROVIDERS[1:]:
            print(f"{p} / torch = {rate[p] / rate['torch']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
