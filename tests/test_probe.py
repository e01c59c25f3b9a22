"""Attention probe: metrics against hand computations, learning on clustered features, errors."""

import json
import math

import pytest
import torch

from tgdp.eval.__main__ import run_probe
from tgdp.eval.common import VideoFeatures
from tgdp.eval.probe import (AttentionProbe, ProbeSettings, _lr_lambda, average_precision, encode_labels,
                             mean_average_precision, stratified_split, top1_accuracy, train_probe)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- metrics by hand

def test_map_hand_computed():
    scores = torch.tensor([
        # c0    c1    c2    c3
        [0.9, 0.10, 0.3, 0.5],
        [0.8, 0.40, 0.2, 0.5],
        [0.7, 0.35, 0.1, 0.1],
        [0.6, 0.80, 0.0, 0.0],
        [0.5, 0.20, 0.4, 0.0],
    ])
    targets = torch.tensor([
        [1, 0, 0, 0],
        [0, 1, 0, 1],
        [1, 0, 0, 1],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
    ], dtype=torch.float32)
    # c0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2 = 5/6
    # c1: order 0.8(-) 0.4(+) 0.35(-) 0.2(+) 0.1(-) -> (1/2 + 2/4) / 2 = 1/2
    # c2: no positive -> excluded
    # c3: tie 0.5/0.5 holds one positive -> threshold 1: P = 1/2, R = 1/2; then 0.1(+): P = 2/3, R = 1
    #     -> 1/2 * 1/2 + 1/2 * 2/3 = 7/12
    assert float(average_precision(scores[:, 0], targets[:, 0])) == pytest.approx(5 / 6, abs=1e-12)
    assert float(average_precision(scores[:, 1], targets[:, 1])) == pytest.approx(1 / 2, abs=1e-12)
    assert float(average_precision(scores[:, 3], targets[:, 3])) == pytest.approx(7 / 12, abs=1e-12)
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1 / 2 + 7 / 12) / 3, abs=1e-12)


def test_top1_hand_computed():
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.2, 0.1, 0.0]])
    assert top1_accuracy(logits, torch.tensor([1, 0, 1, 2])) == 0.5


def test_metric_errors():
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(torch.rand(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(torch.tensor([[float("nan")]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        mean_average_precision(torch.rand(4, 3), torch.zeros(4, 2))


# ----------------------------------------------------------------------------- labels and splits

def test_encode_labels():
    y, classes = encode_labels([["dog"], ["cat"], ["dog"]], "multiclass")
    assert classes == ["cat", "dog"] and y.tolist() == [1, 0, 1]
    y, classes = encode_labels([["dog", "bark"], ["cat"]], "multilabel")
    assert classes == ["bark", "cat", "dog"] and y.tolist() == [[1, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="exactly one label"):
        encode_labels([["dog", "bark"]], "multiclass")
    with pytest.raises(ValueError, match=r"\['cow'\] are not among"):
        encode_labels([["cow"]], "multiclass", classes=["cat", "dog"])
    with pytest.raises(ValueError, match="empty"):
        encode_labels([], "multiclass")


def test_stratified_split_keeps_every_class_in_train():
    labels = [["a"]] * 9 + [["b"]] * 3 + [["c"]]
    tr, va = stratified_split(labels, 0.34, seed=1)
    assert sorted(tr + va) == list(range(13)) and not set(tr) & set(va)
    assert {labels[i][0] for i in tr} == {"a", "b", "c"}
    assert sum(labels[i][0] == "a" for i in va) == 3 and sum(labels[i][0] == "b" for i in va) == 1


# ----------------------------------------------------------------------------- model and schedule

def test_probe_shapes_and_unimodal_ignores_other_modality():
    a, v = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    both = AttentionProbe(8, 5, 16, "both", num_heads=2)
    assert both(a, v).shape == (3, 5)
    audio = AttentionProbe(8, 5, 16, "audio", num_heads=2).eval()
    torch.testing.assert_close(audio(a, v), audio(a, torch.randn(3, 16, 8)))
    assert audio(a, None).shape == (3, 5)
    with pytest.raises(ValueError, match=r"video input must be \[B, 16, D\]"):
        both(a, None)
    with pytest.raises(ValueError, match="divisible"):
        AttentionProbe(10, 5, num_heads=4)
    # frame order matters (learned frame embeddings): the probe is not a bag of frames
    torch.testing.assert_close(both(a, v), both(a, v))
    assert not torch.allclose(both(a, v), both(a.flip(1), v.flip(1)))


def test_warmup_cosine_schedule():
    f = _lr_lambda(total=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


# ----------------------------------------------------------------------------- learning on clustered features

def clustered(n: int, classes: int, d: int = 16, t: int = 16, noise: float = 1.5, seed: int = 0,
              multilabel: bool = False):
    g = torch.Generator().manual_seed(seed)
    mu_a = torch.randn(classes, d, generator=torch.Generator().manual_seed(99))
    mu_v = torch.randn(classes, d, generator=torch.Generator().manual_seed(98))
    if multilabel:
        y = (torch.rand(n, classes, generator=g) < 0.3).float()
        y[y.sum(1) == 0, 0] = 1.0
        ma, mv = y @ mu_a, y @ mu_v
    else:
        y = torch.randint(0, classes, (n,), generator=g)
        ma, mv = mu_a[y], mu_v[y]
    a = ma[:, None] + noise * torch.randn(n, t, d, generator=g)
    v = mv[:, None] + noise * torch.randn(n, t, d, generator=g)
    return a, v, y


def test_probe_learns_multiclass_above_chance():
    train, val = clustered(160, 4, seed=0), clustered(80, 4, seed=1)
    s = ProbeSettings(task="multiclass", epochs=6, batch_size=32, lr=1e-3, warmup_epochs=1, num_heads=2)
    res = train_probe(train, val, 4, s)
    assert [h["epoch"] for h in res.history] == list(range(1, 7))
    assert res.history[-1]["top1"] > 0.8                      # chance = 0.25
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[-1]["lr"] < s.lr                         # cosine decays after warmup


def test_probe_learns_multilabel_with_mixup():
    train, val = clustered(160, 5, seed=2, multilabel=True), clustered(80, 5, seed=3, multilabel=True)
    chance = mean_average_precision(torch.rand(80, 5, generator=torch.Generator().manual_seed(0)), val[2])
    s = ProbeSettings(task="multilabel", epochs=6, batch_size=32, lr=1e-3, warmup_epochs=1, num_heads=2,
                      mixup=0.5, modality="video")
    res = train_probe(train, val, 5, s)
    assert res.metric == "mAP" and res.history[-1]["mAP"] > max(0.75, chance + 0.3)


def test_probe_is_reproducible_and_leaves_global_rng_alone():
    train, val = clustered(40, 3, seed=4), clustered(20, 3, seed=5)
    s = ProbeSettings(epochs=2, batch_size=16, warmup_epochs=0, num_heads=2, mixup=0.5, seed=7)
    torch.manual_seed(123)
    r1 = train_probe(train, val, 3, s)
    after = torch.rand(1)
    torch.manual_seed(123)
    r2 = train_probe(train, val, 3, s)
    assert r1.history == r2.history and torch.equal(after, torch.rand(1))


def test_probe_errors():
    a, v, y = clustered(8, 2)
    bad = a.clone()
    bad[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="train: audio features contain NaN"):
        train_probe((bad, v, y), (a, v, y), 2, ProbeSettings(num_heads=2))
    with pytest.raises(ValueError, match="val: empty"):
        train_probe((a, v, y), (a[:0], v[:0], y[:0]), 2, ProbeSettings(num_heads=2))
    with pytest.raises(ValueError, match="3 targets for 8 videos"):
        train_probe((a, v, y[:3]), (a, v, y), 2, ProbeSettings(num_heads=2))
    with pytest.raises(ValueError, match="probe.warmup_epochs"):
        ProbeSettings(epochs=2, warmup_epochs=3).validate()
    with pytest.raises(ValueError, match="probe.modality"):
        ProbeSettings(modality="text").validate()


def test_run_probe_writes_json(tmp_path):
    a, v, y = clustered(48, 3, seed=6)
    names = ["bark", "meow", "moo"]
    f = VideoFeatures(a, v, [str(i) for i in range(48)], [[names[i]] for i in y.tolist()])
    tr, va = stratified_split(f.labels, 0.25)

    def sub(idx):
        return VideoFeatures(f.a[idx], f.v[idx], [f.ids[i] for i in idx], [f.labels[i] for i in idx])

    out = run_probe(sub(tr), sub(va), ProbeSettings(epochs=2, batch_size=16, warmup_epochs=0, num_heads=2), tmp_path)
    disk = json.loads((tmp_path / "probe.json").read_text())
    assert disk["classes"] == names and len(disk["history"]) == 2 and disk["metric"] == "top1"
    assert disk["best"] == out["best"] == max(h["top1"] for h in disk["history"])


def test_cli_probe_with_real_model_and_loader(tmp_path):
    from test_retrieval import real_checkpoint, write_shards

    from tgdp.eval.__main__ import main

    real_checkpoint(tmp_path)
    write_shards(tmp_path / "shards", 8)
    argv = ["probe", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "shards"), "--val-frac", "0.25",
            "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4", "--num-heads", "4", "--modality", "audio",
            "--out", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "eval" / "probe.json").read_text())
    assert res["classes"] == ["high", "low"] and res["num_train"] == 6 and res["num_val"] == 2
    assert [h["epoch"] for h in res["history"]] == [1, 2] and res["settings"]["modality"] == "audio"


def test_presets_follow_supplement_table_and_accept_overrides():
    v = ProbeSettings.vggsound(epochs=3)
    assert (v.task, v.lr, v.batch_size, v.warmup_epochs, v.epochs) == ("multiclass", 1e-3, 48, 1.0, 3)
    a = ProbeSettings.audioset()
    assert (a.task, a.lr, a.epochs, a.warmup_epochs) == ("multilabel", 5e-2, 15, 1.5)


def test_input_standardisation_removes_a_common_offset():
    # Frozen globals early in pretraining share a large common vector; the probe standardises each
    # dimension with training statistics, so an affine per-dimension change of all features is a no-op.
    train, val = clustered(64, 3, seed=8), clustered(32, 3, seed=9)
    s = ProbeSettings(epochs=2, batch_size=16, warmup_epochs=0, num_heads=2)
    shift, scale = 50 * torch.randn(16), 0.1 + torch.rand(16)

    def moved(d):
        return d[0] * scale + shift, d[1] * scale - shift, d[2]

    r1, r2 = train_probe(train, val, 3, s), train_probe(moved(train), moved(val), 3, s)
    for h1, h2 in zip(r1.history, r2.history):
        assert h1["top1"] == h2["top1"] and h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-3)
    probe = r2.model
    torch.testing.assert_close(probe.in_mean[0], moved(train)[0].mean((0, 1)))
