"""tgdp.data.dali: the DALI path equals the torch path (CPU operators, device_id=None).

Observed on this CPU box (DALI 2.4 vs PIL 13, libjpeg-turbo on both sides):
- frames stored at the model size (no resize): max |diff| 4.8e-7 in normalised units (rounding
  of the normalisation only; the decoded JPEG pixels are identical);
- frames resized (DALI cubic vs PIL bicubic, both antialiased): max |diff| 0.035 (32 -> 24),
  0.10 (32 -> 16), 0.14 (64 -> 48); mean 0.004-0.007 normalised units (x 0.226 for [0, 1] pixels).
  Stored frames are 224, so the paper config never resizes; the tiny config (96) does;
- audio windows: bit-identical (same FLAC samples, same torch fbank/window code).

Order and frames are planned per (seed, epoch) in Python, so DALI's train frames equal the torch
path's draws, epochs differ, a fresh loader at epoch e replays epoch e, and corrupt samples (found
by a probe when DALI raises) leave the other samples' order unchanged.
"""

from collections import Counter

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
            out[(b.ids[j // per], f)] = (b.audio[j], b.frames[j], int(b.audio_valid[j]))
    return out


def _compare(root, mode, img=S, frame=None, batch=2, data=DataConfig(shuffle_buffer=1)):
    torch_b = list(TorchLoader(ShardDataset(root, mode, data=data, img_size=img, frame=frame), batch))
    dali_b = list(DaliLoader(root, mode, data=data, img_size=img, batch_size=batch, frame=frame, num_threads=2))
    t, d = _rows(torch_b), _rows(dali_b)
    if mode == "train":  # DALI drops the last partial batch in train
        assert set(d) <= set(t) and len(d) == len(t) // batch * batch
    else:
        assert sorted(t) == sorted(d) and len(t) > 0
    assert all(t[k][2] == d[k][2] for k in d), "valid audio columns differ between the loaders"
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
    # the planned frame gets the audio window and image of that frame, as the torch path forced to it
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


# ----------------------------------------------------------------------------- epochs and resume


def _epoch(ld, epoch):
    ld.set_epoch(epoch)
    return list(ld)


def _trace(batches):
    """Everything a batch carries, for exact comparisons between runs."""
    return [(b.ids, b.frame_idx.tolist(), b.audio, b.frames) for b in batches]


def _same(a, b):
    return len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
                                    for x, y in zip(a, b))


def test_epochs_differ_and_fresh_loader_replays_epoch(root):
    kw = dict(data=DataConfig(time_shift=0.2), img_size=S, batch_size=2, seed=7, drop_last=False)
    a = DaliLoader(root, "train", **kw)
    runs = [_trace(_epoch(a, e)) for e in range(3)]
    orders = [[(i, f) for ids, fr, _, _ in r for i, f in zip(ids, fr)] for r in runs]
    for o in orders:  # every epoch delivers every clip once
        assert sorted(i for i, _ in o) == [f"clip{i:03d}" for i in range(5)]
    assert len({tuple(o) for o in orders}) == 3  # order and/or frames change with the epoch
    assert len({tuple(i for i, _ in o) for o in orders}) >= 2  # the order itself changes
    fresh = DaliLoader(root, "train", **kw)
    assert _same(_trace(_epoch(fresh, 2)), runs[2])  # a resumed run replays epoch 2 exactly
    assert _same(_trace(_epoch(fresh, 0)), runs[0])
    # the frames are the torch path's draws for (seed, epoch, id): both paths see the same frames
    for e in range(3):
        ds = ShardDataset(root, "train", data=DataConfig(shuffle_buffer=1), img_size=S, seed=7)
        ds.set_epoch(e)
        assert dict(orders[e]) == {it["id"]: int(it["frame_idx"][0]) for it in ds}


# ----------------------------------------------------------------------------- corrupt samples


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory):
    """Two shards, good clips mixed with: a truncated JPEG (every frame), garbage FLAC, a missing
    frame, 8 kHz audio and broken JSON; the first shard has no .idx (scanned), the second has one."""
    r = tmp_path_factory.mktemp("dali_corrupt")
    g = [good_sample(i) for i in range(6)]
    k, m, f, j = g[0]
    bad = [("badjpg", parts_of("badjpg", meta("badjpg", 24000), f, [x[: len(x) // 2] for x in j])),
           ("badflac", parts_of("badflac", meta("badflac", 24000), b"fLaC" + bytes(range(256)) * 8, j)),
           ("nojpg", {e: v for e, v in parts_of("nojpg", meta("nojpg", 24000), f, j).items() if e != "f03.jpg"}),
           ("sr8k", parts_of("sr8k", meta("sr8k", 12000), flac(tone(1.5, 300)[:12000], 8000), j)),
           ("badjson", {**parts_of("badjson", m, f, j), "json": b"{not json"})]
    ok = [(s[0], parts_of(*s)) for s in g]
    write_raw_shard(r, "shard-000000.tar", [ok[0], bad[0], ok[1], bad[1], ok[2]])
    write_raw_shard(r, "shard-000001.tar", [ok[3], bad[2], bad[3], ok[4], bad[4], ok[5]])
    from tgdp.data.dali import scan_shard
    lines = [" ".join(f"{e} {o} {n} {name}" for e, (o, n, name) in mem.items())
             for _, mem, _ in scan_shard(r / "shard-000001.tar")]
    (r / "shard-000001.idx").write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    m = new_manifest(img_size=S)
    m["shards"] = [{"path": "shard-000000.tar", "count": 5}, {"path": "shard-000001.tar", "count": 6}]
    write_manifest(r, m)
    return r


GOOD = [f"clip{i:03d}" for i in range(6)]
BAD = {"bad image": 1, "bad audio": 1, "missing member": 1, "wrong sample rate": 1, "bad metadata": 1}


def test_corrupt_samples_skipped_counted_like_torch(corrupt_root):
    ld = DaliLoader(corrupt_root, "eval", img_size=S, batch_size=2)
    batches = list(ld)
    torch_ld = TorchLoader(ShardDataset(corrupt_root, "eval", img_size=S), 2)
    ref = list(torch_ld)
    assert [i for b in batches for i in b.ids] == [i for b in ref for i in b.ids] == GOOD  # none lost, none added
    assert dict(ld.skipped) == dict(torch_ld.skipped) == BAD
    assert sum((Counter(b.skipped) for b in batches), Counter()) == BAD  # reported with the batches
    assert set(ld.bad.values()) == {"bad image", "bad audio"}
    t, d = _rows(ref), _rows(batches)
    assert all(torch.equal(t[k][0], d[k][0]) and (t[k][1] - d[k][1]).abs().max() <= FRAME_TOL_SAME_SIZE for k in t)
    again = list(ld)  # known bad samples are planned out, and counted again once in this pass
    assert [i for b in again for i in b.ids] == GOOD and dict(ld.skipped) == {k: 2 * v for k, v in BAD.items()}


def test_corrupt_found_mid_epoch_keeps_the_epoch_of_a_run_that_knew(corrupt_root):
    kw = dict(img_size=S, batch_size=2, seed=3, drop_last=False)
    knew = DaliLoader(corrupt_root, "train", **kw)
    _epoch(knew, 0)  # finds the undecodable samples
    before = dict(knew.skipped)
    ref = _trace(_epoch(knew, 1))  # planned without them
    fresh = DaliLoader(corrupt_root, "train", **kw)
    probes, find = [], fresh._find_bad
    fresh._find_bad = lambda cands: probes.append(cands[0][1]) or find(cands)
    got = _trace(_epoch(fresh, 1))  # meets them in the middle of the epoch
    assert len(probes) == 2 and probes[-1] != got[0][0][0]  # a probe started after the first delivered batch
    assert _same(got, ref)
    assert sorted(i for ids, *_ in got for i in ids) == GOOD
    assert dict(fresh.skipped) == BAD and {k: knew.skipped[k] - before.get(k, 0) for k in BAD} == BAD


@pytest.mark.parametrize("with_index", [True, False])
def test_truncated_tar_loses_only_the_cut_samples(tmp_path, with_index):
    write_dataset(tmp_path, [3, 2])
    tar = tmp_path / "shard-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])  # cut inside the third sample
    if not with_index:  # the header scan stops at the cut (tarfile reads what it can)
        tar.with_suffix(".idx").unlink()
    ld = DaliLoader(tmp_path, "eval", img_size=S, batch_size=2)
    assert [i for b in ld for i in b.ids] == ["clip000", "clip001", "clip003", "clip004"]
    assert dict(ld.skipped) == {"bad shard": 1}


def test_plan_partitions_ranks_counts_flaws_and_indexes_the_frame(tmp_path):
    """tgdp.data.dali_plan on a hand-made catalog (no DALI run): the ranks' parts are disjoint and,
    with the skipped samples, cover every sample once; each shard's samples stay consecutive; the
    order is a function of (seed, epoch); the index files name the planned frame ``img`` at its offset."""
    from tgdp.data.dali import scan_shard as reexported
    from tgdp.data.dali_plan import ShardEntry, plan_epoch, scan_shard, write_indexes
    from tgdp.data.shards import read_index
    assert reexported is scan_shard
    exts = ["json", "flac"] + [f"f{i:02d}.jpg" for i in range(16)]

    def entry(s, n, flaw):
        off = np.array([[10_000 * s + 100 * i + c for c in range(18)] for i in range(n)], np.int64)
        return ShardEntry(f"/d/s{s}.tar", [f"k{s}{i}" for i in range(n)], [f"k{s}{i}." for i in range(n)],
                          off, np.ones_like(off), flaw)

    shards = [entry(0, 4, {1: "missing member"}), entry(1, 3, {}), entry(2, 5, {})]
    bad, frame_of = {(1, 2): "bad image"}, lambda key, e: (int(key[1:]) + e) % 16

    def plan(epoch, rank=0, world=1, seed=5):
        return plan_epoch(shards, bad, epoch=epoch, seed=seed, shuffle=True, rank=rank, world_size=world,
                          bad_tars=1, frame_of=frame_of)

    parts = [plan(0, r, 3) for r in range(3)]
    got = [(s, i) for p, _ in parts for s, i, _ in p]
    assert len(got) == len(set(got)) == 10 and set(got) == {(s, i) for s, n in enumerate((4, 3, 5)) for i in range(n)} - {(0, 1), (1, 2)}
    assert sum((c for _, c in parts), Counter()) == {"missing member": 1, "bad image": 1, "bad shard": 1}
    assert parts[0][1]["bad shard"] == 1                                    # unreadable tars: rank 0 only
    full, _ = plan(0)
    assert [(s, i) for s, i, _ in full] == got                              # rank parts are contiguous
    runs = [s for j, (s, _, _) in enumerate(full) if j == 0 or full[j - 1][0] != s]
    assert sorted(runs) == [0, 1, 2]                                        # one run per shard
    assert all(f == frame_of(f"k{s}{i}", 0) for s, i, f in full)
    assert plan(3) == plan(3) and len({tuple(plan(e)[0]) for e in range(4)}) > 1
    paths, idx = write_indexes(tmp_path / "run", shards, exts, full)
    assert paths == [shards[s].path for s in runs]
    lines = [fields for f in idx for fields in read_index(f)]
    assert len(lines) == len(full)
    for fields, (s, i, f) in zip(lines, full):
        assert [e for e, *_ in fields] == ["json", "flac", "img"]
        assert fields[2][1:] == (10_000 * s + 100 * i + 2 + f, 1, f"k{s}{i}.{exts[2 + f]}")


def test_loader_argument_errors(root):
    for kw, match in ((dict(rank=2, world_size=2), "rank"), (dict(batch_size=0), "batch_size"),
                      (dict(num_threads=0), "num_threads"), (dict(frame=16), "frame"), (dict(mel="x"), "mel")):
        with pytest.raises(ValueError, match=match):
            DaliLoader(root, "eval", **kw)
    with pytest.raises(ValueError, match="mode"):
        DaliLoader(root, "test")
    with pytest.raises(ValueError, match="epoch"):
        DaliLoader(root, "eval").set_epoch(-1)
