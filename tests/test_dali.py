"""tgdp.data.dali: the DALI path equals the torch path (CPU operators, device_id=None).

Observed on this CPU box (DALI 2.4 vs PIL 13, libjpeg-turbo on both sides):
- frames stored at the model size (no resize): max |diff| 4.8e-7 in normalised units (rounding
  of the normalisation only; the decoded JPEG pixels are identical);
- frames resized (DALI cubic vs PIL bicubic, both antialiased): max |diff| 0.035 (32 -> 24),
  0.10 (32 -> 16), 0.14 (64 -> 48); mean 0.004-0.007 normalised units (x 0.226 for [0, 1] pixels).
  Stored frames are 224, so the paper config never resizes; the tiny config (96) does;
- audio windows: bit-identical (same FLAC samples, same torch fbank/window code).
"""

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from kaldi_reference import kaldi_fbank  # noqa: E402
from test_loader import SR, S, parts_of, good_sample, meta, flac, tone, write_dataset, write_raw_shard  # noqa: E402
from tgdp.configs import DataConfig  # noqa: E402
from tgdp.data.dali import DaliLoader, dali_logmel_numpy  # noqa: E402
from tgdp.data.loader import ShardDataset, TorchLoader  # noqa: E402
from tgdp.data.shards import new_manifest, write_manifest  # noqa: E402

FRAME_TOL_SAME_SIZE = 1e-5
FRAME_TOL_RESIZE_MAX, FRAME_TOL_RESIZE_MEAN = 0.3, 0.02


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("dali_shards")
    write_dataset(r, [3, 2])
    return r


def _rows(batches):
    out = {}
    for b in batches:
        per = b.audio.shape[0] // len(b.ids)  # 16 rows per video in retrieval
        for j, f in enumerate(b.frame_idx.tolist()):
            out[(b.ids[j // per], f)] = (b.audio[j], b.frames[j])
    return out


def _compare(root, mode, img=S, frame=None, batch=2, data=DataConfig(shuffle_buffer=1)):
    torch_b = list(TorchLoader(ShardDataset(root, mode, data=data, img_size=img, frame=frame), batch))
    dali_b = list(DaliLoader(root, mode, data=data, img_size=img, batch_size=batch, frame=frame, num_threads=2))
    t, d = _rows(torch_b), _rows(dali_b)
    if mode == "train":  # DALI drops the last partial batch in train
        assert set(d) <= set(t) and len(d) == len(t) // batch * batch
    else:
        assert sorted(t) == sorted(d) and len(t) > 0
    da = max(float((t[k][0] - d[k][0]).abs().max()) for k in d)
    df = torch.stack([(t[k][1] - d[k][1]).abs() for k in d])
    return da, float(df.max()), float(df.mean()), dali_b


def test_eval_equals_torch(root):
    da, fmax, _, batches = _compare(root, "eval")
    assert da <= 1e-6 and fmax <= FRAME_TOL_SAME_SIZE
    assert all(int(f) == 8 for b in batches for f in b.frame_idx)
    assert batches[0].audio.shape == (2, 416, 128) and batches[0].frames.shape == (2, 3, S, S)


@pytest.mark.parametrize("frame", [0, 15])
def test_forced_frame_in_train_equals_torch(root, frame):
    da, fmax, _, _ = _compare(root, "train", frame=frame)
    assert da <= 1e-6 and fmax <= FRAME_TOL_SAME_SIZE


def test_time_shift_equals_torch(root):
    data = DataConfig(shuffle_buffer=1, time_shift=0.3)
    da, fmax, _, _ = _compare(root, "train", frame=4, data=data)
    assert da <= 1e-6 and fmax <= FRAME_TOL_SAME_SIZE


def test_retrieval_equals_torch(root):
    da, fmax, _, batches = _compare(root, "retrieval")
    assert da <= 1e-6 and fmax <= FRAME_TOL_SAME_SIZE
    assert batches[0].frame_idx.tolist() == list(range(16)) * 2 and len(batches[0].ids) == 2


def test_resized_frames_within_decoder_tolerance(root):
    da, fmax, fmean, _ = _compare(root, "eval", img=24)
    assert da <= 1e-6
    assert fmax <= FRAME_TOL_RESIZE_MAX and fmean <= FRAME_TOL_RESIZE_MEAN


def test_train_frame_choice_reproducible_from_seed(root):
    def run(seed, epochs=3):
        ld = DaliLoader(root, "train", data=DataConfig(shuffle_buffer=4), img_size=S, batch_size=2, seed=seed)
        batches = [b for _ in range(epochs) for b in ld]
        return [[(i, int(f)) for i, f in zip(b.ids, b.frame_idx)] for b in batches], batches

    a, batches = run(3)
    assert a == run(3)[0]
    assert a != run(4)[0]
    assert len(a) == 6 and all(len(x) == 2 for x in a)  # 5 samples, batch 2: last partial batch dropped
    seen = [f for x in a for _, f in x]
    assert all(0 <= f < 16 for f in seen) and len(set(seen)) >= 4
    # the DALI-chosen frame gets the audio window and image of that frame, as the torch path forced to it
    b = batches[0]
    for j, i in enumerate(b.ids):
        f = int(b.frame_idx[j])
        ref = next(it for it in ShardDataset(root, "eval", img_size=S, frame=f) if it["id"] == i)
        assert torch.equal(b.audio[j], ref["audio"][0])
        assert (b.frames[j] - ref["frames"][0]).abs().max() <= FRAME_TOL_SAME_SIZE


def test_rank_sharding_partitions(root):
    ids = []
    for rank in range(2):
        ids += [i for b in DaliLoader(root, "eval", img_size=S, batch_size=2, rank=rank, world_size=2) for i in b.ids]
    assert sorted(ids) == [f"clip{i:03d}" for i in range(5)]


def test_wrong_sample_rate_dropped_and_counted(tmp_path):
    k0, m0, f0, j0 = good_sample(0)
    samples = [(k0, parts_of(k0, m0, f0, j0)),
               ("sr8k", parts_of("sr8k", meta("sr8k", 12000), flac(tone(1.5, 300)[:12000], 8000), j0))]
    write_raw_shard(tmp_path, "shard-000000.tar", samples)
    m = new_manifest(img_size=S)
    m["shards"] = [{"path": "shard-000000.tar", "count": 2}]
    write_manifest(tmp_path, m)
    ld = DaliLoader(tmp_path, "eval", img_size=S, batch_size=2)
    batches = list(ld)
    assert [i for b in batches for i in b.ids] == [k0]
    assert dict(ld.skipped) == {"wrong sample rate": 1}


def test_dali_native_mel_deviation_is_as_documented():
    # The table in tgdp.data.dali.dali_logmel: several log units in mel bins 0-9, small above.
    t = np.arange(2 * SR) / SR
    waves = {"tone": 0.3 * np.sin(2 * np.pi * 440 * t), "low+dc": 0.3 * np.sin(2 * np.pi * 30 * t) + 0.25,
             "noise": np.random.default_rng(0).standard_normal(SR) * 0.1}
    waves = {k: (np.round(v * 32768) / 32768).astype(np.float32) for k, v in waves.items()}
    outs = dict(zip(waves, dali_logmel_numpy(list(waves.values()))))
    err = {}
    for k, w in waves.items():
        ref = kaldi_fbank(w)
        assert outs[k].shape == ref.shape and np.isfinite(outs[k]).all()
        err[k] = np.abs(outs[k] - ref)
        assert err[k].max() < 10.0 and err[k][:, 10:].max() < 1.5 and np.median(err[k][:, 10:]) < 0.01
    assert err["tone"].max() < 0.05
    assert err["noise"][:, :10].max() > 1.0  # really different: DALI has no per-frame DC removal


def test_dali_mel_variant_in_loader(root):
    ld = DaliLoader(root, "eval", img_size=S, batch_size=5, mel="dali")
    (b,) = list(ld)
    t = next(iter(TorchLoader(ShardDataset(root, "eval", img_size=S), 5)))
    assert b.audio.shape == t.audio.shape and torch.isfinite(b.audio).all()
    diff = (b.audio - t.audio).abs() * 4.4849  # back to log units
    assert diff.max() < 10.0 and diff[:, :, 10:].median() < 0.5
