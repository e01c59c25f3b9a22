"""The CAV-MAE Sync single pass (``masking.dual_path false``): the ablation baseline.

Reference: the single pass must equal the reference dual path fed the *same* view twice with the
CLS not detached (forward and every gradient: the chain rule does not care whether the two uses of
one function of the weights come from one pass or two). Fast model: equal to the reference.
FLOPs: one pass and no teacher, so fewer than the dual path.
"""

import pytest
import torch

from tgdp.configs import apply_overrides, paper, tiny
from tgdp.flops import _counter, count_step_flops
from tgdp.masking import random_masks
from tgdp.method import TGDP
from tgdp.model import FastCAVMAESync
from tgdp.reference.model import CAVMAESync

from test_fast_model import _batch, _perturb   # distinct LN copies and tokens; seeded inputs

TOL = dict(atol=1e-5, rtol=1e-5)
SINGLE = {"masking.dual_path": False, "loss.w_dis": 0.0}
PAPER_SLICE = {"model.depth": 2, "model.modality_specific_depth": 1, "model.decoder_depth": 1}
FIELDS = ("loss", "loss_rec", "loss_rec_a", "loss_rec_v", "loss_dis", "loss_con", "acc")


def _inputs(m, b, seed=0):
    return _batch(m, b, seed)[:3]   # audio, frames, rec masks (drawn before the con masks)


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def _no_teacher(method):
    def boom(*a, **k):
        raise AssertionError("the single pass without distillation must not run the teacher")
    method.teacher.module.teacher_forward = boom


def test_reference_single_pass_equals_dual_path_on_one_view():
    cfg = tiny()
    torch.manual_seed(0)
    model = CAVMAESync(cfg.model)
    _perturb(model, 1)
    audio, frames, rec = _inputs(cfg.model, 3)
    single = model.student_forward_single(audio, frames, rec)
    (single.pred_a.square().mean() + single.pred_v.square().mean()
     + (single.cls_a * single.cls_v).sum()).backward()
    g_single = _grads(model)
    model.zero_grad(set_to_none=True)
    dual = model.student_forward(audio, frames, rec, rec, rec_grad_to_cls=True)
    (dual.pred_a.square().mean() + dual.pred_v.square().mean() + (dual.cls_a * dual.cls_v).sum()).backward()
    g_dual = _grads(model)
    for f in ("pred_a", "pred_v", "cls_a", "cls_v"):
        torch.testing.assert_close(getattr(single, f), getattr(dual, f), **TOL, msg=f)
    assert g_single.keys() == g_dual.keys() and {"cls_token_a", "cls_token_v"} <= g_single.keys()
    for k in g_dual:
        torch.testing.assert_close(g_single[k], g_dual[k], **TOL, msg=k)


@pytest.mark.parametrize("preset,over", [("tiny", {}), ("paper_slice", PAPER_SLICE)])
def test_fast_single_pass_matches_reference(preset, over):
    base = tiny() if preset == "tiny" else paper()
    cfg = apply_overrides(base, {**SINGLE, **over}).validate()
    torch.manual_seed(0)
    ref = TGDP(cfg, CAVMAESync(cfg.model))
    _perturb(ref.student, 1)
    fast = TGDP(cfg, FastCAVMAESync(cfg.model))
    fast.student.load_state_dict(ref.student.state_dict())
    audio, frames, rec = _inputs(cfg.model, 2, seed=4)
    outs, grads = {}, {}
    for name, method in (("ref", ref), ("fast", fast)):
        _no_teacher(method)
        out = method(audio, frames, masks_rec=rec)
        out.loss.backward()
        outs[name], grads[name] = out, _grads(method.student)
    for f in FIELDS:
        torch.testing.assert_close(getattr(outs["fast"], f), getattr(outs["ref"], f), **TOL, msg=f)
    assert float(outs["ref"].loss_dis.detach()) == 0.0 and float(outs["ref"].loss_con.detach()) > 0
    assert grads["ref"].keys() == grads["fast"].keys() and len(grads["ref"]) > 50
    for k in grads["ref"]:
        torch.testing.assert_close(grads["fast"][k], grads["ref"][k], **TOL, msg=k)


@pytest.mark.parametrize("impl", [CAVMAESync, FastCAVMAESync])
def test_single_pass_contrastive_loss_trains_the_cls_tokens(impl):
    """Only the contrastive loss: its gradient reaches the CLS tokens (they are not detached)."""
    cfg = apply_overrides(tiny(), {**SINGLE, "loss.w_rec": 0.0}).validate()
    method = TGDP(cfg, impl(cfg.model))
    audio, frames, rec = _inputs(cfg.model, 3, seed=2)
    method(audio, frames, masks_rec=rec).loss.backward()
    for name in ("cls_token_a", "cls_token_v"):
        g = getattr(method.student, name).grad
        assert g is not None and g.abs().max() > 0, name


def test_single_pass_draws_only_reconstruction_masks():
    cfg = apply_overrides(tiny(), SINGLE).validate()
    method = TGDP(cfg, FastCAVMAESync(cfg.model))
    _no_teacher(method)
    m = cfg.model
    audio, frames, _ = _inputs(m, 2)
    out = method(audio, frames, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    want = (random_masks(2, m.num_patches_a, 0.75, g), random_masks(2, m.num_patches_v, 0.75, g))
    for got, exp in zip(out.masks_rec, want):
        assert torch.equal(got.ids_keep, exp.ids_keep)
    assert out.masks_con is out.masks_rec
    with pytest.raises(ValueError, match="dual_path=false"):
        method(audio, frames, masks_rec=out.masks_rec, masks_con=out.masks_rec)


def test_single_pass_with_distillation_runs_the_teacher():
    cfg = apply_overrides(tiny(), {"masking.dual_path": False, "loss.w_dis": 0.1}).validate()
    method = TGDP(cfg, FastCAVMAESync(cfg.model))
    assert method.runs_teacher
    audio, frames, rec = _inputs(cfg.model, 2)
    assert float(method(audio, frames, masks_rec=rec).loss_dis.detach()) > 0


def _counted_training_step(cfg, batch=2):
    """FLOPs of one real step (masks drawn by the method, teacher as the step runs it), per sample."""
    m = cfg.model
    method = TGDP(cfg, FastCAVMAESync(m, device="meta"), check_finite=False)
    audio = torch.zeros(batch, m.audio_length, m.n_mels, device="meta")
    frames = torch.zeros(batch, m.in_chans, m.img_size, m.img_size, device="meta")
    rec = (random_masks(batch, m.num_patches_a, cfg.masking.rec_ratio, torch.Generator(), "cpu"),
           random_masks(batch, m.num_patches_v, cfg.masking.rec_ratio, torch.Generator(), "cpu"))
    rec = tuple(type(x)(x.ids_keep.to("meta"), x.ids_restore.to("meta"), x.mask.to("meta")) for x in rec)
    with _counter() as fc:   # the counter tgdp.flops uses (CPU SDPA formulas added)
        method(audio, frames, masks_rec=rec).loss.backward()
    return fc.get_total_flops() / batch


def test_flops_single_pass_below_dual_path():
    single = apply_overrides(tiny(), SINGLE).validate()
    dual_random = apply_overrides(tiny(), {"masking.guide": "random", "loss.w_dis": 0.0}).validate()
    s = count_step_flops(single, "fast")
    d = count_step_flops(dual_random, "fast")
    t = count_step_flops(tiny(), "fast")
    assert s["teacher"] == 0 and d["teacher"] == 0 and t["teacher"] > 0
    assert s["total"] < d["total"] < t["total"]
    # it drops the contrastive view's encoder pass (a 50 % view): ~40 % of the student at tiny()
    assert s["student"] < 0.7 * d["student"]
    # the table's count equals a direct count of the training step with drawn masks (meta device)
    assert s["total"] == pytest.approx(_counted_training_step(single), rel=1e-6)
