"""Attention probe: metrics by hand, the official head against a written-out CAVMAEFT forward, the
features it reads, training (targets, class balance, mixup, weight averaging), the reported figure
(final or chosen on a carved training split, never the evaluation maximum), the CLI and errors."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tgdp.configs import PROBE_TASKS, ConfigError, ProbeConfig, paper, probe_task, tgdp, tiny
from tgdp.eval import probe as probe_mod
from tgdp.eval.__main__ import run_probe
from tgdp.eval.common import VideoFeatures
from tgdp.eval.probe import (OfficialProbeHead, TokenProbeHead, _lr_lambda, average_precision,
                             class_balanced_weights, encode_labels, evaluate_probe, mean_average_precision,
                             soft_targets, stratified_split, top1_accuracy, train_probe)


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


# ----------------------------------------------------------------------------- heads

def official_forward(head: OfficialProbeHead, a, v):
    """CAVMAEFT.forward(mode='multimodal') after the encoder, written out with plain tensor ops from
    the head's parameters: x = [cls_cls_token; concat(cls_a, cls_v) per frame], 2 pre-norm blocks
    (unified LNs, qkv bias, exact GELU), classifier_norm on every token, classifier_head on token 0."""
    x = torch.cat([a, v], -1) if v is not None else a
    x = torch.cat([head.cls_cls_token.expand(len(x), -1, -1), x], 1)
    for blk in head.classifier_layers:
        h = F.layer_norm(x, x.shape[-1:], blk.norm1.weight, blk.norm1.bias, 1e-5)
        b, n, w = h.shape
        nh = blk.attn.num_heads
        qkv = (h @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).reshape(b, n, 3, nh, w // nh)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // nh), -1)
        x = x + ((att @ val).transpose(1, 2).reshape(b, n, w) @ blk.attn.proj.weight.t() + blk.attn.proj.bias)
        h = F.layer_norm(x, x.shape[-1:], blk.norm2.weight, blk.norm2.bias, 1e-5)
        hidden = F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        x = x + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    x = F.layer_norm(x, x.shape[-1:], head.classifier_norm.weight, head.classifier_norm.bias, 1e-5)
    return x[:, 0] @ head.classifier_head.weight.t() + head.classifier_head.bias


def test_official_head_is_the_released_cavmaeft_layout():
    torch.manual_seed(1)
    head = OfficialProbeHead(24, 5, num_frames=16, modality="both")      # 2D = 48 wide, 12 heads
    a, v = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    torch.testing.assert_close(head(a, v), official_forward(head, a, v), atol=1e-5, rtol=1e-5)
    assert head.cls_cls_token.shape == (1, 1, 48) and len(head.classifier_layers) == 2
    assert head.classifier_layers[0].attn.num_heads == 12 and head.classifier_layers[0].mlp.fc1.out_features == 192
    assert head.classifier_head.in_features == 48 and head.classifier_norm.normalized_shape == (48,)
    # official state-dict names (CAVMAEFT), nothing else: no frame / modality embedding, no standardisation
    assert {k.split(".")[0] for k in head.state_dict()} == {"cls_cls_token", "classifier_layers",
                                                            "classifier_norm", "classifier_head"}
    # no frame embedding: the head does not see the frame order
    perm = torch.randperm(16)
    torch.testing.assert_close(head(a[:, perm], v[:, perm]), head(a, v), atol=1e-5, rtol=1e-5)
    # init: Linear xavier (zero bias), LayerNorm (1, 0), token ~ N(0, 0.02)
    assert torch.count_nonzero(head.classifier_head.bias) == 0 and torch.all(head.classifier_norm.weight == 1)
    assert 0.005 < float(head.cls_cls_token.detach().std()) < 0.05


def test_official_head_unimodal_uses_one_width_d_token_per_frame():
    head = OfficialProbeHead(24, 4, modality="audio").eval()
    a = torch.randn(2, 16, 24)
    assert head.cls_cls_token.shape == (1, 1, 24)
    torch.testing.assert_close(head(a, None), official_forward(head, a, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(a, torch.randn(2, 16, 24)), head(a, None))
    with pytest.raises(ValueError, match=r"audio input must be \[B, 16, D\]"):
        head(None, a)
    with pytest.raises(ValueError, match="divisible by num_heads=12"):
        OfficialProbeHead(10, 4)


def test_token_head_sees_frame_order_and_modalities():
    a, v = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    both = TokenProbeHead(24, 5, 16, "both")
    assert both(a, v).shape == (3, 5)
    assert not torch.allclose(both(a, v), both(a.flip(1), v.flip(1)))   # learned frame embeddings
    audio = TokenProbeHead(24, 5, 16, "audio").eval()
    torch.testing.assert_close(audio(a, v), audio(a, torch.randn(3, 16, 24)))
    with pytest.raises(ValueError, match=r"video input must be \[B, 16, D\]"):
        both(a, None)


def test_warmup_cosine_schedule():
    f = _lr_lambda(total=100, warmup=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


# ----------------------------------------------------------------------------- features the heads read

def test_probe_features_follow_the_released_file():
    from tgdp.eval.probe_features import ProbeFeatures
    from tgdp.model import build_encoder
    from tgdp.patching import audio_as_image

    cfg = tiny().model
    torch.manual_seed(0)
    enc = build_encoder(cfg, "reference").eval()
    audio, frames = torch.randn(2, cfg.audio_length, cfg.n_mels), torch.randn(2, 3, cfg.img_size, cfg.img_size)
    r = cfg.num_register_tokens
    with torch.no_grad():   # written out: patch embed + pos + modality, [CLS, patches, registers]
        seqs = {}
        for m, x, pe, pos, mod, cls, regs, blocks in (
                ("a", audio_as_image(audio), enc.patch_embed_a, enc.pos_embed_a, enc.modality_a, enc.cls_token_a,
                 enc.register_tokens[:r], enc.blocks_a),
                ("v", frames, enc.patch_embed_v, enc.pos_embed_v, enc.modality_v, enc.cls_token_v,
                 enc.register_tokens[r:], enc.blocks_v)):
            t = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=cfg.patch_size).flatten(2).transpose(1, 2)
            t = torch.cat([cls.expand(2, -1, -1), t + pos + mod, regs.expand(2, -1, -1)], 1)
            for blk in blocks:
                t = blk(t)
            seqs[m] = t[:, :-r]                                  # registers dropped
        both = ProbeFeatures(enc, "official", "both").extract_features(audio, frames)
        torch.testing.assert_close(both[0], seqs["a"][:, 0])     # CLS before the joint layer, no norm
        torch.testing.assert_close(both[1], seqs["v"][:, 0])
        uni = ProbeFeatures(enc, "official", "audio").extract_features(audio, frames)
        u = seqs["a"]
        for blk in enc.blocks_u:
            u = blk(u)                                           # unified LNs (modality=None)
        torch.testing.assert_close(uni[0], enc.norm(u).mean(1))  # mean over CLS + patches
        tok = ProbeFeatures(enc, "tokens").extract_features(audio, frames)
        for got, want in zip(tok, enc.extract_features(audio, frames)):
            torch.testing.assert_close(got, want)
    assert not torch.allclose(both[0], tok[0])


# ----------------------------------------------------------------------------- targets and sampling

def test_soft_targets_follow_the_cavmae_loader():
    y = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    partner = torch.tensor([[0, 0, 0, 1.0], [1.0, 0, 0, 0]])
    plain = soft_targets(y, 0.1)
    torch.testing.assert_close(plain, torch.tensor([[0.9, 0.025, 0.025, 0.025], [0.025, 0.9, 0.9, 0.025]]))
    lam = torch.tensor([0.7, 0.4])
    mixed = soft_targets(y, 0.1, partner, lam, torch.tensor([True, False]))
    # row 0 mixed: 0.025 + 0.9 * (0.7 y + 0.3 partner); row 1 not mixed: plain
    torch.testing.assert_close(mixed[0], torch.tensor([0.025 + 0.63, 0.025, 0.025, 0.025 + 0.27]))
    torch.testing.assert_close(mixed[1], plain[1])


def test_class_balanced_weights_and_sampling():
    y = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0], [1.0, 1.0]])
    w = class_balanced_weights(y)
    c0, c1 = 1000 / 4.01, 1000 / 2.01                           # class counts 4 and 2
    torch.testing.assert_close(w, torch.tensor([c0, c0, c0, c1, c0 + c1]))
    # a 9:1 imbalanced set is drawn about 1:1
    y = F.one_hot(torch.tensor([0] * 900 + [1] * 100), 2).float()
    draw = torch.multinomial(class_balanced_weights(y), 1000, replacement=True,
                             generator=torch.Generator().manual_seed(0))
    assert 0.45 < float((draw >= 900).float().mean()) < 0.55


# ----------------------------------------------------------------------------- training on clustered features

def clustered(n: int, classes: int, d: int = 24, t: int = 16, noise: float = 1.5, seed: int = 0,
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


FAST = dict(epochs=6, batch_size=32, warmup_epochs=1.0, wa_start=3)


@pytest.mark.parametrize("head", ["official", "tokens"])
def test_probe_learns_multiclass_and_reports_the_final_model(head):
    train, ev = clustered(160, 4, seed=0), clustered(80, 4, seed=1)
    cfg = ProbeConfig(head=head, **FAST)
    res = train_probe(train, ev, 4, cfg)
    assert [h["epoch"] for h in res.history] == list(range(1, 7)) and res.metric == "top1"
    assert res.result > 0.8                                     # chance = 0.25
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[-1]["lr"] < cfg.lr                       # cosine decays after warmup
    assert res.chosen == "weight average of epochs 3-6"
    assert res.result == evaluate_probe(res.model, *ev, task="multiclass")["top1"]


def test_multilabel_toy_set_with_mixup_reports_map():
    train, ev = clustered(160, 5, seed=2, multilabel=True), clustered(80, 5, seed=3, multilabel=True)
    chance = mean_average_precision(torch.rand(80, 5, generator=torch.Generator().manual_seed(0)), ev[2])
    cfg = dataclasses.replace(probe_task("audioset"), modality="video", lr=1e-3, **FAST)
    assert (cfg.task, cfg.mixup, cfg.class_balanced) == ("multilabel", 0.5, False)
    res = train_probe(train, ev, 5, cfg)
    assert res.metric == "mAP" and res.result > max(0.75, chance + 0.3)
    assert res.result == evaluate_probe(res.model, *ev, task="multilabel")["mAP"]


def test_weight_average_is_the_mean_of_the_epoch_weights(monkeypatch):
    train, ev = clustered(64, 3, seed=4), clustered(32, 3, seed=5)
    seen = []
    real = probe_mod.evaluate_probe

    def spy(model, *args, **kw):
        seen.append({k: x.detach().clone() for k, x in model.state_dict().items()})
        return real(model, *args, **kw)

    monkeypatch.setattr(probe_mod, "evaluate_probe", spy)
    res = train_probe(train, ev, 3, ProbeConfig(epochs=4, batch_size=16, warmup_epochs=0, wa_start=2))
    epochs, final = seen[:4], res.model.state_dict()            # one evaluation per epoch, then the report
    for k in final:
        want = sum(epochs[e][k].double() for e in (1, 2, 3)) / 3
        torch.testing.assert_close(final[k].double(), want, atol=1e-6, rtol=1e-6)
    no_wa = train_probe(train, ev, 3, ProbeConfig(epochs=4, batch_size=16, warmup_epochs=0, wa=False))
    assert no_wa.chosen == "epoch 4 (final)"
    torch.testing.assert_close(no_wa.model.state_dict()["classifier_head.weight"], epochs[3]["classifier_head.weight"])


def test_val_selection_uses_a_split_of_the_training_data_only():
    train = clustered(120, 3, seed=6)
    ev1, ev2 = clustered(40, 3, seed=7), clustered(40, 3, seed=8)
    cfg = ProbeConfig(select="val", val_frac=0.25, epochs=4, batch_size=16, warmup_epochs=0, wa_start=2)
    r1, r2 = train_probe(train, ev1, 3, cfg), train_probe(train, ev2, 3, cfg)
    assert r1.num_select == 30 and r1.num_train == 90 and "selected on 30 carved training clips" in r1.chosen
    # the evaluation split cannot influence the choice: same model whatever it holds
    assert r1.chosen == r2.chosen
    for k, x in r1.model.state_dict().items():
        assert torch.equal(x, r2.model.state_dict()[k])
    # the chosen candidate is the best on the carved split, and its figure is measured once on the eval split
    best_epoch = max(h["select_top1"] for h in r1.history)
    assert r1.result == evaluate_probe(r1.model, *ev1, task="multiclass")["top1"]
    if r1.chosen.startswith("epoch"):
        assert r1.history[int(r1.chosen.split()[1].rstrip(",")) - 1]["select_top1"] == best_epoch


def test_probe_is_reproducible_and_leaves_global_rng_alone():
    train, ev = clustered(40, 3, seed=4), clustered(20, 3, seed=5)
    cfg = ProbeConfig(epochs=2, batch_size=16, warmup_epochs=0, wa_start=1, seed=7)
    torch.manual_seed(123)
    r1 = train_probe(train, ev, 3, cfg)
    after = torch.rand(1)
    torch.manual_seed(123)
    r2 = train_probe(train, ev, 3, cfg)
    assert r1.history == r2.history and r1.result == r2.result and torch.equal(after, torch.rand(1))


def test_probe_errors():
    a, v, y = clustered(8, 2)
    bad = a.clone()
    bad[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="train: audio features contain NaN"):
        train_probe((bad, v, y), (a, v, y), 2)
    with pytest.raises(ValueError, match="evaluation: empty"):
        train_probe((a, v, y), (a[:0], v[:0], y[:0]), 2)
    with pytest.raises(ValueError, match="3 targets for 8 videos"):
        train_probe((a, v, y[:3]), (a, v, y), 2)
    with pytest.raises(ConfigError, match="probe.warmup_epochs"):
        ProbeConfig(epochs=2, warmup_epochs=3).validate()
    with pytest.raises(ConfigError, match="probe.wa_start"):
        ProbeConfig(epochs=2, warmup_epochs=0).validate()          # wa_start 3 > 2 epochs
    with pytest.raises(ConfigError, match="probe task='esc50'"):
        probe_task("esc50")


# ----------------------------------------------------------------------------- presets (supplement Table 1)

def test_probe_tasks_are_supplement_table_1():
    v, a = probe_task("vggsound"), probe_task("audioset")
    # Table 1 "VGG LP": Adam, lr 1e-3, cosine, 10 epochs, 1 warmup epoch, batch 48, class-balanced,
    # mixup, CE, weight averaging
    assert (v.task, v.lr, v.epochs, v.warmup_epochs, v.batch_size, v.class_balanced, v.mixup > 0, v.wa) == \
        ("multiclass", 1e-3, 10, 1.0, 48, True, True, True)
    # Table 1 "AS20K LP": lr 5e-2, 15 epochs, 1.5 warmup, batch 48, not class-balanced, mixup, BCE, WA
    assert (a.task, a.lr, a.epochs, a.warmup_epochs, a.batch_size, a.class_balanced, a.mixup > 0, a.wa) == \
        ("multilabel", 5e-2, 15, 1.5, 48, False, True, True)
    for p in (v, a):   # supplement §1.4: Adam (0.95, 0.999); CAV-MAE fine-tuning code: weight decay 5e-7
        assert (p.optimizer, p.betas, p.weight_decay) == ("adam", (0.95, 0.999), 5e-7)
    kept = probe_task("audioset", ProbeConfig(head="tokens", modality="audio", seed=3))
    assert (kept.head, kept.modality, kept.seed) == ("tokens", "audio", 3)
    assert set(PROBE_TASKS) == {"vggsound", "audioset"}
    assert paper().probe == tgdp().probe == probe_task("vggsound") and paper().probe.head == "official"


# ----------------------------------------------------------------------------- run_probe and the CLI

def test_run_probe_writes_json(tmp_path):
    a, v, y = clustered(48, 3, seed=6)
    names = ["bark", "meow", "moo"]
    f = VideoFeatures(a, v, [str(i) for i in range(48)], [[names[i]] for i in y.tolist()])
    tr, ev = stratified_split(f.labels, 0.25)

    def sub(idx):
        return VideoFeatures(f.a[idx], f.v[idx], [f.ids[i] for i in idx], [f.labels[i] for i in idx])

    out = run_probe(sub(tr), sub(ev), ProbeConfig(epochs=2, batch_size=16, warmup_epochs=0, wa_start=1), tmp_path)
    disk = json.loads((tmp_path / "probe.json").read_text())
    assert disk["classes"] == names and len(disk["history"]) == 2 and disk["metric"] == "top1"
    assert disk["result"] == out["result"] and "best" not in disk and disk["num_eval"] == len(ev)
    assert disk["settings"]["head"] == "official" and disk["chosen"] == "weight average of epochs 1-2"


def _cli(tmp_path, *extra, labels=None, n=8, status=0):
    from test_retrieval import real_checkpoint, write_shards

    from tgdp.eval.__main__ import main

    real_checkpoint(tmp_path)
    write_shards(tmp_path / "shards", n, labels=labels)
    argv = ["probe", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "shards"), "--eval-frac", "0.25",
            "--out", str(tmp_path / "eval"), "--device", "cpu", *extra]
    assert main(argv) == status
    return json.loads((tmp_path / "eval" / "probe.json").read_text()) if status == 0 else None


def test_cli_probe_with_real_model_and_loader(tmp_path, capsys):
    toml = tmp_path / "probe.toml"
    toml.write_text("[probe]\nepochs = 3\nbatch_size = 4\nlr = 0.01\n")
    res = _cli(tmp_path, "--config", str(toml), "--epochs", "2", "--warmup-epochs", "0", "--modality", "audio",
               "--probe.wa_start", "1", "--probe.lr", "0.002")
    assert res["classes"] == ["high", "low"] and res["num_train"] == 6 and res["num_eval"] == 2
    s = res["settings"]   # checkpoint config -> TOML [probe] -> shortcut flags -> --probe.* overrides
    assert (s["epochs"], s["batch_size"], s["lr"], s["modality"], s["wa_start"], s["head"]) == \
        (2, 4, 0.002, "audio", 1, "official")
    assert [h["epoch"] for h in res["history"]] == [1, 2] and 0.0 <= res["result"] <= 1.0
    assert f"top1: {res['result']:.4f} on 2 evaluation clips" in capsys.readouterr().out


def test_cli_probe_multilabel_toy_set(tmp_path):
    names = [["dog", "bark"], ["cat"], ["dog"], ["cat", "meow"]] * 3
    res = _cli(tmp_path, "--task", "audioset", "--probe.epochs", "2", "--probe.warmup_epochs", "0",
               "--probe.wa_start", "1", "--probe.batch_size", "4", labels=names, n=12)
    assert res["metric"] == "mAP" and res["classes"] == ["bark", "cat", "dog", "meow"]
    assert res["settings"]["task"] == "multilabel" and res["settings"]["lr"] == 5e-2
    assert 0.0 < res["result"] <= 1.0


def test_cli_probe_bad_config_names_the_field(tmp_path, capsys, monkeypatch):
    """One line, exit 2, before the checkpoint's weights are read or any feature is computed."""
    import tgdp.eval.common

    def forbid(*a, **k):
        raise AssertionError("the checkpoint was loaded before the config error")

    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nlr = 0.1\n")
    _cli(tmp_path, "--config", str(toml), status=2)
    assert "a probe config holds only a [probe] table, found ['train']" in capsys.readouterr().err
    monkeypatch.setattr(tgdp.eval.common, "load_checkpoint", forbid)
    _cli(tmp_path, "--probe.epoch", "3", status=2)
    assert "tgdp.eval: error: config error: probe.epoch" in capsys.readouterr().err
    _cli(tmp_path, "--head", "linear", status=2)
    assert "probe.head='linear' is not a choice; must be one of ['official', 'tokens']" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "probe.json").exists()


def test_cli_probe_on_a_small_demo_set(tmp_path):
    """The demo corpus (10 classes; 2 clips per class to train, 1 to evaluate) through the real loader
    and a tiny() encoder, the official head, the default VGGSound settings shortened to 3 epochs."""
    from test_retrieval import _save_ckpt

    from tgdp.configs import apply_overrides
    from tgdp.data import synthetic
    from tgdp.eval.__main__ import main
    from tgdp.model import build_encoder

    demo = synthetic.ensure_demo(tmp_path / "demo", n_train=20, n_val=10, workers=0, progress=False)
    cfg = apply_overrides(tiny(), {"data.num_workers": 0, "data.loader": "torch", "train.model_impl": "reference",
                                   "eval.batch_videos": 5}).validate()
    torch.manual_seed(0)
    _save_ckpt(tmp_path / "ckpt.pt", cfg, build_encoder(cfg.model, "reference"))
    argv = ["probe", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(demo / "train"), "--eval-data",
            str(demo / "val"), "--probe.epochs", "3", "--probe.wa_start", "2", "--probe.batch_size", "8",
            "--out", str(tmp_path / "eval"), "--device", "cpu"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "eval" / "probe.json").read_text())
    assert len(res["classes"]) == 10 and res["num_train"] == 20 and res["num_eval"] == 10
    assert res["metric"] == "top1" and res["chosen"] == "weight average of epochs 2-3"
    assert res["settings"]["head"] == "official" and res["settings"]["class_balanced"] is True
    assert res["result"] in {i / 10 for i in range(11)} and len(res["history"]) == 3
