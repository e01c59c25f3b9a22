"""TG-DP method: masks from the teacher, losses wired right, gradients, batch size 1, bad inputs."""

import dataclasses

import pytest
import torch

from tgdp.configs import apply_overrides, tiny
from tgdp.masking import random_masks
from tgdp.method import TGDP, MaskNoise, TGDPOutput
from tgdp.patching import audio_as_image, patchify

SMALL = {"model.depth": 3, "model.modality_specific_depth": 2, "model.decoder_depth": 1}


def make(**over):
    cfg = apply_overrides(tiny(), {**SMALL, **over}).validate()
    torch.manual_seed(0)
    return TGDP(cfg)


@pytest.fixture(scope="module")
def method():
    return make()


def inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    return (torch.randn(b, m.audio_length, m.n_mels, generator=g),
            torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=g))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_output_is_a_fixed_frozen_dataclass(method):
    audio, frames = inputs(method.cfg)
    out = method(audio, frames, gen())
    assert isinstance(out, TGDPOutput)
    assert [f.name for f in dataclasses.fields(out)] == [
        "loss", "loss_rec", "loss_rec_a", "loss_rec_v", "loss_dis", "loss_con", "acc", "masks_rec", "masks_con"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = None
    w = method.cfg.loss
    want = w.w_rec * (out.loss_rec_a + out.loss_rec_v) + w.w_dis * out.loss_dis + w.w_con * out.loss_con
    assert torch.allclose(out.loss, want) and torch.allclose(out.loss_rec, out.loss_rec_a + out.loss_rec_v)
    assert all(t.dim() == 0 for t in (out.loss, out.loss_dis, out.loss_con, out.acc))


def test_mask_counts_and_guided_masks_follow_the_unshuffled_teacher(method):
    cfg = method.cfg
    audio, frames = inputs(cfg)
    out = method(audio, frames, gen())
    na, nv = cfg.model.num_patches_a, cfg.model.num_patches_v
    assert na == 208
    assert out.masks_rec[0].num_keep == 52 and out.masks_con[0].num_keep == 104    # 208 audio patches
    assert out.masks_rec[1].num_keep == int(nv * 0.25) and out.masks_con[1].num_keep == int(nv * 0.5)
    with torch.no_grad():
        t = method.teacher.module.teacher_forward(audio, frames)
    for scores, m in ((t.scores_a, out.masks_con[0]), (t.scores_v, out.masks_con[1])):
        for row in range(2):
            want = set(torch.topk(scores[row], m.num_keep).indices.tolist())
            assert set(m.ids_keep[row].tolist()) == want


def test_official_compat_changes_the_guided_masks():
    m = make(**{"masking.official_compat": True})
    audio, frames = inputs(m.cfg)
    out = m(audio, frames, gen())
    with torch.no_grad():
        t = m.teacher.module.teacher_forward(audio, frames)
    top = set(torch.topk(t.scores_a[0], out.masks_con[0].num_keep).indices.tolist())
    assert set(out.masks_con[0].ids_keep[0].tolist()) != top


def test_reconstruction_loss_is_the_masked_patch_mse(method):
    cfg = method.cfg
    audio, frames = inputs(cfg)
    out = method(audio, frames, gen())
    with torch.no_grad():
        s = method.student.student_forward(audio, frames, out.masks_rec, out.masks_con)
    p = cfg.model.patch_size
    for pred, img, mask, got in ((s.pred_a, audio_as_image(audio), out.masks_rec[0].mask, out.loss_rec_a),
                                 (s.pred_v, frames, out.masks_rec[1].mask, out.loss_rec_v)):
        target = patchify(img, p)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)   # norm_pix: unbiased var
        target = (target - mu) / torch.sqrt(var + 1e-6)
        per_patch = ((pred - target) ** 2).mean(-1)
        assert torch.allclose(got, (per_patch * mask).sum() / mask.sum(), rtol=1e-5)


def test_precomputed_masks_and_determinism(method):
    audio, frames = inputs(method.cfg)
    a = method(audio, frames, gen(3))
    b = method(audio, frames, gen(3))
    c = method(audio, frames, masks_rec=a.masks_rec, masks_con=a.masks_con)    # no generator needed
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss, c.loss)
    d = method(audio, frames, gen(4))
    assert not torch.equal(a.masks_rec[0].ids_keep, d.masks_rec[0].ids_keep)


@pytest.mark.parametrize("over", [{"masking.guide": "random"}, {"masking.guide": "gumbel"},
                                  {"masking.official_compat": True, "masking.guide": "gumbel"}])
def test_mask_draws_follow_one_fixed_order(over):
    """forward(generator) draws rec audio, rec video, then the contrastive uniforms (per modality:
    official_compat shuffle, gumbel draw; or the random con masks), and only those: the same masks
    as MaskNoise drawn by hand from a generator with the same seed."""
    m = make(**over)
    audio, frames = inputs(m.cfg)
    out = m(audio, frames, gen(5))
    g = gen(5)
    na, nv, b = m.cfg.model.num_patches_a, m.cfg.model.num_patches_v, audio.shape[0]
    fields = m.noise_fields()
    noise = MaskNoise(**{f: torch.rand(b, na if f.endswith("a") else nv, generator=g) for f in fields})
    assert fields[:2] == ("rec_a", "rec_v")
    drawn = m.draw_noise(b, torch.device("cpu"), gen(5))
    assert all(torch.equal(getattr(drawn, f), getattr(noise, f)) for f in fields)
    by_hand = m(audio, frames, noise=noise)
    for x, y in zip((*out.masks_rec, *out.masks_con), (*by_hand.masks_rec, *by_hand.masks_con)):
        assert torch.equal(x.ids_keep, y.ids_keep)
    assert torch.equal(out.loss, by_hand.loss)


def test_given_masks_are_not_drawn_again():
    """With masks_rec given (the training step) and guide="distinct", forward draws nothing: the
    reconstruction masks are not drawn only to be discarded, and no generator is needed."""
    m = make()
    audio, frames = inputs(m.cfg)
    a = m(audio, frames, gen(1))
    g = gen(2)
    state = g.get_state()
    b = m(audio, frames, g, masks_rec=a.masks_rec)
    assert torch.equal(g.get_state(), state)
    c = m(audio, frames, masks_rec=a.masks_rec)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss, c.loss)
    assert m.noise_fields(rec=False) == ()
    gm = make(**{"masking.guide": "gumbel"})
    assert gm.noise_fields(rec=False) == ("con_a", "con_v")
    with pytest.raises(ValueError, match="noise lacks"):
        gm(audio, frames, masks_rec=a.masks_rec, noise=MaskNoise())


def test_gradients_reach_the_student_and_never_the_teacher():
    m = make()
    audio, frames = inputs(m.cfg)
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    out = m(audio, frames, gen())
    out.loss.backward()
    s = m.student
    for name in ("cls_token_a", "cls_token_v", "register_tokens", "modality_a", "patch_embed_v.proj.weight",
                 "blocks_a.0.attn.qkv.weight", "blocks_u.0.norm1_a.weight", "blocks_u.0.norm1.weight",
                 "norm.weight", "norm_a.weight", "norm_v.weight", "mask_token", "decoder_pred_a.weight",
                 "decoder_pred_v.weight"):
        p = s.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    opt.step()
    for k, v in m.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k                  # the optimizer never moves it
    mom = m.update_teacher(step=1, total_steps=10)
    assert mom == m.cfg.teacher.momentum
    w_t, w_s = m.teacher.module.blocks_u[0].attn.qkv.weight, s.blocks_u[0].attn.qkv.weight
    w_0 = teacher_before["module.blocks_u.0.attn.qkv.weight"]
    assert torch.allclose(w_t, mom * w_0 + (1 - mom) * w_s, atol=1e-7)


@pytest.mark.parametrize("flag", [False, True])
def test_reconstruction_gradients_and_the_cls_tokens(flag):
    m = make(**{"loss.w_con": 0.0, "loss.w_dis": 0.0, "loss.rec_grad_to_cls": flag})
    audio, frames = inputs(m.cfg)
    m(audio, frames, gen()).loss.backward()
    g = m.student.cls_token_a.grad
    if flag:
        assert g is not None and g.abs().sum() > 0       # official behaviour
    else:
        assert g is None or torch.all(g == 0)            # recon never reaches the CLS tokens


def test_batch_size_one(method):
    audio, frames = inputs(method.cfg, b=1)
    out = method(audio, frames, gen())
    assert torch.isfinite(out.loss) and out.masks_rec[0].ids_keep.shape[0] == 1
    out.loss.backward()
    method.student.zero_grad(set_to_none=True)


@pytest.mark.parametrize("over", [{"masking.guide": "gumbel", "loss.symmetric": True},
                                  {"masking.guide": "random", "loss.w_dis": 0.0},
                                  {"masking.score_direction": "cls_to_patch", "masking.renormalize_scores": False}])
def test_options_run(over):
    m = make(**over)
    audio, frames = inputs(m.cfg)
    out = m(audio, frames, gen())
    assert torch.isfinite(out.loss)
    if over.get("loss.w_dis") == 0.0:
        assert out.loss_dis.item() == 0.0


def test_official_schedule_gives_the_same_losses(method):
    audio, frames = inputs(method.cfg)
    a = method(audio, frames, gen(1))
    b = method(audio, frames, gen(1), schedule="official")
    assert torch.equal(a.loss, b.loss)


def _bad(cfg, kind):
    audio, frames = inputs(cfg)
    if kind == "length":
        audio = torch.randn(2, cfg.model.audio_length + 1, cfg.model.n_mels)
    elif kind == "channels":
        frames = frames[:, :2]
    elif kind == "nan":
        audio = audio.clone()
        audio[1, 5, 7] = float("nan")
    elif kind == "batch0":
        audio, frames = audio[:0], frames[:0]
    elif kind == "mels":
        audio = audio[:, :, :64]
    return audio, frames


@pytest.mark.parametrize("kind, match", [("length", "T=417"), ("channels", "C=2"), ("nan", "audio has 1 non-finite"),
                                         ("batch0", "B=0"), ("mels", "F=64")])
def test_bad_input_raises_before_compute(method, monkeypatch, kind, match):
    def boom(*a, **k):
        raise AssertionError("model compute ran before the input check")
    monkeypatch.setattr(method.student, "student_forward", boom)
    monkeypatch.setattr(method.teacher.module, "teacher_forward", boom)
    audio, frames = _bad(method.cfg, kind)
    with pytest.raises(ValueError, match=match):
        method(audio, frames, gen())


def test_other_argument_errors(method):
    audio, frames = inputs(method.cfg)
    with pytest.raises(ValueError, match="generator"):
        method(audio, frames)
    bad = random_masks(3, method.cfg.model.num_patches_a, 0.75, gen())
    with pytest.raises(ValueError, match=r"masks_rec\[0\]"):
        method(audio, frames, gen(), masks_rec=(bad, bad))
    with pytest.raises(TypeError, match="dtype"):
        method(audio.long(), frames, gen())
    method.check_finite = False                            # the hot-loop switch skips only the value scan
    try:
        nan_audio = audio.clone()
        nan_audio[0, 0, 0] = float("nan")
        assert torch.isnan(method(nan_audio, frames, gen()).loss_rec_a)
    finally:
        method.check_finite = True
