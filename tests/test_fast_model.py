"""Fast model (tgdp.model.FastCAVMAESync) against the reference CAVMAESync: same weights, same masks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tgdp.configs import apply_overrides, paper, tiny
from tgdp.masking import random_masks
from tgdp.method import TGDP
from tgdp.model import FastCAVMAESync
from tgdp.model.packing import view_layout
from tgdp.reference.model import CAVMAESync

TOL = dict(atol=1e-5, rtol=1e-5)
PAPER_SLICE = ["--model.depth", "2", "--model.modality_specific_depth", "1", "--model.decoder_depth", "1"]


def _perturb(module, seed):
    """Make every LayerNorm copy (norm1 / norm1_a / norm1_v ...) and token distinct, so a wrong LN
    mode, a swapped token or a missed parameter changes the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # LN weights/biases, linear biases, CLS/register/modality/mask tokens (matrices keep
            # their xavier scale so activations stay O(1) and fp32 rounding stays comparable).
            if p.dim() <= 1 or "token" in name or "modality" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _batch(m, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, m.audio_length, m.n_mels, generator=g)
    frames = torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=g)
    rec = (random_masks(b, m.num_patches_a, 0.75, g), random_masks(b, m.num_patches_v, 0.75, g))
    con = (random_masks(b, m.num_patches_a, 0.5, g), random_masks(b, m.num_patches_v, 0.5, g))
    return audio, frames, rec, con


def _pair(cfg):
    """Reference and fast TGDP with identical student and (different from it) teacher weights."""
    torch.manual_seed(0)
    ref = TGDP(cfg, CAVMAESync(cfg.model))
    _perturb(ref.student, 1)
    _perturb(ref.teacher.module, 2)
    fast = TGDP(cfg, FastCAVMAESync(cfg.model))
    fast.student.load_state_dict(ref.student.state_dict())
    fast.teacher.module.load_state_dict(ref.teacher.module.state_dict())
    return ref, fast


def _check_parity(cfg, b):
    ref, fast = _pair(cfg)
    audio, frames, rec, con = _batch(cfg.model, b)
    outs = {}
    for name, method in (("ref", ref), ("fast", fast)):
        # Record what the step's own teacher / student calls return (no extra forwards).
        seen = {}
        for key, mod, fn in (("t", method.teacher.module, "teacher_forward"),
                             ("s", method.student, "student_forward")):
            orig = getattr(mod, fn)
            setattr(mod, fn, lambda *a, _o=orig, _k=key, **kw: seen.setdefault(_k, _o(*a, **kw)))
        out = method(audio, frames, masks_rec=rec, masks_con=con)
        out.loss.backward()
        grads = {k: p.grad for k, p in method.student.named_parameters()}
        outs[name] = (out, seen["t"], seen["s"], grads)
    (ro, rt, rs, rg), (fo, ft, fs, fg) = outs["ref"], outs["fast"]
    for f in ("loss", "loss_rec", "loss_rec_a", "loss_rec_v", "loss_dis", "loss_con", "acc"):
        torch.testing.assert_close(getattr(fo, f), getattr(ro, f), **TOL, msg=f)
    assert float(ro.loss_dis.detach()) > 0  # the teacher ran in the step (w_dis > 0)
    for f in ("scores_a", "scores_v", "cls_a", "cls_v"):
        torch.testing.assert_close(getattr(ft, f), getattr(rt, f), **TOL, msg=f"teacher {f}")
    for f in ("pred_a", "pred_v", "cls_a", "cls_v"):
        torch.testing.assert_close(getattr(fs, f), getattr(rs, f), **TOL, msg=f"student {f}")
    assert rg.keys() == fg.keys()
    n_grads = 0
    for k in rg:
        assert (rg[k] is None) == (fg[k] is None), k
        if rg[k] is not None:
            torch.testing.assert_close(fg[k], rg[k], **TOL, msg=k)
            n_grads += 1
    return n_grads


def test_parity_tiny():
    cfg = tiny()
    n = _check_parity(cfg, b=3)
    assert n > 100  # every trained tensor of the encoders, joint layer and decoder was compared


def test_parity_paper_slice():
    cfg = apply_overrides(paper(), PAPER_SLICE).validate()
    _check_parity(cfg, b=2)


@pytest.mark.parametrize("rec_grad_to_cls", [False, True])
def test_rec_grad_to_cls_parity_and_effect(rec_grad_to_cls):
    """Only the reconstruction loss: the CLS tokens get gradients from it iff rec_grad_to_cls."""
    cfg = apply_overrides(tiny(), {"loss.w_dis": 0.0, "loss.w_con": 0.0,
                                   "loss.rec_grad_to_cls": rec_grad_to_cls}).validate()
    ref, fast = _pair(cfg)
    audio, frames, rec, con = _batch(cfg.model, 2, seed=3)
    for method in (ref, fast):
        method(audio, frames, masks_rec=rec, masks_con=con).loss.backward()
    for name in ("cls_token_a", "cls_token_v"):
        gr = getattr(ref.student, name).grad
        gf = getattr(fast.student, name).grad
        if rec_grad_to_cls:
            assert gf is not None and gf.abs().max() > 0
            torch.testing.assert_close(gf, gr, **TOL)
        else:
            # The con path's CLS output is unused here, so its gradient is exactly zero or absent.
            assert gf is None or not gf.any()
            assert gr is None or not gr.any()


@pytest.mark.parametrize("over", [
    {"model.num_register_tokens": 0},                                  # no registers to drop
    {"model.depth": 3, "model.modality_specific_depth": 1},            # 2 chained joint layers
])
def test_forward_parity_other_shapes(over):
    """Forwards only: R = 0, and several joint layers (scores from the last one, as the reference)."""
    base = {"model.decoder_depth": 1, "model.depth": 2, "model.modality_specific_depth": 1}
    cfg = apply_overrides(tiny(), {**base, **over}).validate()
    torch.manual_seed(0)
    ref = CAVMAESync(cfg.model)
    _perturb(ref, 6)
    fast = FastCAVMAESync(cfg.model)
    fast.load_state_dict(ref.state_dict())
    audio, frames, rec, con = _batch(cfg.model, 2, seed=7)
    with torch.no_grad():
        pairs = [(fast.student_forward(audio, frames, rec, con), ref.student_forward(audio, frames, rec, con)),
                 (fast.teacher_forward(audio, frames, direction="cls_to_patch", renormalize=False),
                  ref.teacher_forward(audio, frames, direction="cls_to_patch", renormalize=False))]
    for f, r in pairs:
        for name in r.__dataclass_fields__:
            torch.testing.assert_close(getattr(f, name), getattr(r, name), **TOL)


def test_extract_features_and_backends_agree():
    cfg = tiny()
    torch.manual_seed(0)
    ref = CAVMAESync(cfg.model)
    _perturb(ref, 4)
    audio, frames, rec, con = _batch(cfg.model, 2, seed=5)
    ra, rv = ref.extract_features(audio, frames)
    for backend in ("sdpa", "math"):
        m = apply_overrides(cfg, {"model.attn_backend": backend}).model
        fast = FastCAVMAESync(m)
        fast.load_state_dict(ref.state_dict())
        fa, fv = fast.extract_features(audio, frames)
        torch.testing.assert_close(fa, ra, **TOL)
        torch.testing.assert_close(fv, rv, **TOL)
        assert fast.attention_backend(audio.device) == backend


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_one_packed_forward_per_encoder_and_no_attention_map():
    """qkv of every block runs once per call (both student views / all three joint passes packed),
    and no softmax map is materialised (the reference model does both differently)."""
    cfg = apply_overrides(tiny(), PAPER_SLICE).validate()
    torch.manual_seed(0)
    fast, ref = FastCAVMAESync(cfg.model), CAVMAESync(cfg.model)
    audio, frames, rec, con = _batch(cfg.model, 1)
    for model, expect_a, expect_u, expect_t, expect_softmax in ((fast, 1, 1, 1, False), (ref, 2, 3, 2, True)):
        calls = {"a": 0, "u": 0}
        h1 = model.blocks_a[0].attn.qkv.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
        h2 = model.blocks_u[0].attn.qkv.register_forward_hook(lambda *_: calls.__setitem__("u", calls["u"] + 1))
        log = _OpLog()
        with log:
            model.student_forward(audio, frames, rec, con)
        assert calls == {"a": expect_a, "u": expect_u}, type(model).__name__
        assert any("_softmax" in op for op in log.ops) == expect_softmax
        calls.update(a=0, u=0)
        log = _OpLog()
        with torch.no_grad(), log:
            model.teacher_forward(audio, frames)
        assert calls == {"a": 1, "u": expect_t}  # fast teacher: a+v packed, no unified joint pass
        assert any("_softmax" in op for op in log.ops) == expect_softmax
        h1.remove(), h2.remove()


def test_static_layouts_are_reused():
    """Layouts depend only on (B, ratios, config): the same cu_seqlens tensor serves every step."""
    cfg = tiny()
    m = cfg.model
    fast = FastCAVMAESync(m)
    r = m.num_register_tokens
    seen = []
    for seed in (0, 1):
        audio, frames, rec, con = _batch(m, 2, seed=seed)
        fast.student_forward(audio, frames, rec, con)
        seen.append(view_layout([(2, 1 + rec[0].num_keep + r), (2, 1 + con[0].num_keep + r)], "cpu"))
    assert seen[0] is seen[1]
    assert seen[0].cu_seqlens.tolist()[:3] == [0, 1 + 52 + r, 2 * (1 + 52 + r)]


def test_errors():
    cfg = tiny()
    fast = FastCAVMAESync(cfg.model)
    audio, frames, rec, con = _batch(cfg.model, 2)
    with pytest.raises(ValueError, match="schedule='official'"):
        fast.student_forward(audio, frames, rec, con, schedule="official")
    with pytest.raises(ValueError, match="direction='up'"):
        fast.teacher_forward(audio, frames, direction="up")
    with pytest.raises(ValueError, match=r"rec\[0\].ids_restore"):
        fast.student_forward(audio, frames, (con[1], rec[1]), con)
    flash = FastCAVMAESync(apply_overrides(cfg, {"model.attn_backend": "flash"}).model)
    with pytest.raises(ValueError, match="attn_backend='flash'"):
        flash.extract_features(audio, frames)
    assert sorted(fast.state_dict()) == sorted(CAVMAESync(cfg.model).state_dict())


@pytest.mark.slow
def test_student_forward_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break (host sync, data-dependent shape): the packed
    forward has static shapes, as CUDA-graph capture needs. ~30 s of compile: opt-in."""
    cfg = apply_overrides(tiny(), PAPER_SLICE).validate()
    fast = FastCAVMAESync(cfg.model)
    audio, frames, rec, con = _batch(cfg.model, 2)
    eager = fast.student_forward(audio, frames, rec, con)
    compiled = torch.compile(fast.student_forward, fullgraph=True, dynamic=False)(audio, frames, rec, con)
    for f in ("pred_a", "pred_v", "cls_a", "cls_v"):
        torch.testing.assert_close(getattr(compiled, f), getattr(eager, f), **TOL)
