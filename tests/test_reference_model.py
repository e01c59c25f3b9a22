"""Reference CAV-MAE Sync model: names and counts, token order, pos tables, masked views, teacher scores."""

import math

import pytest
import torch

from tgdp.configs import apply_overrides, paper, tiny
from tgdp.masking import guided_masks, random_masks
from tgdp.reference.model import CAVMAESync
from tgdp.reference.patch_global_scores import patch_global_scores
from tgdp.reference.pos_embed import sincos_2d


def small_cfg(**kw):
    over = {"model.depth": 3, "model.modality_specific_depth": 2, "model.decoder_depth": 1}
    over.update(kw)
    return apply_overrides(tiny(), over).validate().model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CAVMAESync(small_cfg()).eval()


def inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.audio_length, cfg.n_mels, generator=g),
            torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g))


def official_keys(cfg):
    """The key list of spec §8.1, written out independently of the model code."""
    block = ["norm1.weight", "norm1.bias", "norm1_a.weight", "norm1_a.bias", "norm1_v.weight", "norm1_v.bias",
             "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "norm2_a.weight", "norm2_a.bias", "norm2_v.weight", "norm2_v.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["modality_a", "modality_v", "pos_embed_a", "pos_embed_v", "register_tokens", "cls_token_a",
            "cls_token_v", "patch_embed_a.proj.weight", "patch_embed_a.proj.bias", "patch_embed_v.proj.weight",
            "patch_embed_v.proj.bias", "norm_a.weight", "norm_a.bias", "norm_v.weight", "norm_v.bias",
            "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
            "decoder_modality_a", "decoder_modality_v", "decoder_pos_embed_a", "decoder_pos_embed_v",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred_a.weight", "decoder_pred_a.bias",
            "decoder_pred_v.weight", "decoder_pred_v.bias"]
    for name, n in (("blocks_a", cfg.modality_specific_depth), ("blocks_v", cfg.modality_specific_depth),
                    ("blocks_u", cfg.joint_depth), ("decoder_blocks", cfg.decoder_depth)):
        keys += [f"{name}.{i}.{s}" for i in range(n) for s in block]
    return keys


def test_paper_parameter_count_and_official_keys():
    cfg = paper().model
    m = CAVMAESync(cfg, device="meta")
    sd = m.state_dict()
    assert sorted(sd) == sorted(official_keys(cfg)) and len(sd) == 650
    total = sum(v.numel() for v in sd.values())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert total == 190_660_864 and trainable == 190_143_744      # spec §1.10
    assert abs(total - 190.7e6) / 190.7e6 < 0.005
    shapes = {"register_tokens": (16, 768), "pos_embed_a": (1, 208, 768), "pos_embed_v": (1, 196, 768),
              "decoder_pos_embed_a": (1, 208, 512), "patch_embed_a.proj.weight": (768, 1, 16, 16),
              "patch_embed_v.proj.weight": (768, 3, 16, 16), "blocks_u.0.attn.qkv.weight": (2304, 768),
              "decoder_pred_a.weight": (256, 512), "decoder_pred_v.weight": (768, 512), "mask_token": (1, 1, 512)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    # The sin-cos tables are persistent buffers, not parameters.
    names = {n for n, _ in m.named_parameters()}
    assert not names & {"pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v"}


def test_audio_token_order_in_the_model(model):
    cfg = model.cfg
    zero = torch.zeros(1, cfg.audio_length, cfg.n_mels)
    audio = zero.clone()
    audio[0, 48:64, 80:96] = torch.randn(16, 16)               # frames 48-63, mel 80-95
    frames = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        diff = (model.embed(audio, frames)[0] - model.embed(zero, frames)[0]).abs().sum(-1)[0]
    assert diff.nonzero().flatten().tolist() == [133]


def test_pos_table_layout_against_float64_formula():
    d, rows, cols = 768, 8, 26
    table = sincos_2d(d, rows, cols)
    half, quarter = d // 2, d // 4
    omega = [10000.0 ** (-i / quarter) for i in range(quarter)]
    for f, t in ((0, 0), (5, 3), (7, 25), (2, 17)):
        tok = f * cols + t
        want_time = [math.sin(t * w) for w in omega] + [math.cos(t * w) for w in omega]
        want_freq = [math.sin(f * w) for w in omega] + [math.cos(f * w) for w in omega]
        got = torch.from_numpy(table[tok]).double()
        assert torch.allclose(got[:half], torch.tensor(want_time, dtype=torch.float64), atol=3e-6)
        assert torch.allclose(got[half:], torch.tensor(want_freq, dtype=torch.float64), atol=3e-6)
    # Channels 0-383 depend only on the time column, 384-767 only on the frequency row.
    tab = torch.from_numpy(table).reshape(rows, cols, d)
    assert torch.equal(tab[:, :, :half], tab[:1, :, :half].expand(rows, -1, -1))
    assert torch.equal(tab[:, :, half:], tab[:, :1, half:].expand(-1, cols, -1))


def test_model_tables_are_the_sincos_tables(model):
    cfg = model.cfg
    fa, ta = cfg.audio_grid
    assert torch.equal(model.pos_embed_a[0], torch.from_numpy(sincos_2d(cfg.embed_dim, fa, ta)))
    hv, wv = cfg.video_grid
    assert torch.equal(model.decoder_pos_embed_v[0], torch.from_numpy(sincos_2d(cfg.decoder_embed_dim, hv, wv)))


def test_initialisation(model):
    assert 0.8 < model.register_tokens.std() < 1.2
    assert model.cls_token_a.std() < 0.05 and model.mask_token.std() < 0.05
    blk = model.blocks_a[0]
    assert torch.all(blk.attn.qkv.bias == 0) and torch.all(blk.norm1.weight == 1)
    w = model.decoder_embed.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))            # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_student_views_use_the_right_patches(model):
    """The decoder un-shuffles correctly: keep order does not matter, removed patches do not matter."""
    cfg = model.cfg
    audio, frames = inputs(cfg, b=2)
    g = torch.Generator().manual_seed(0)
    na, nv = cfg.num_patches_a, cfg.num_patches_v
    rec = (random_masks(2, na, 0.75, g), random_masks(2, nv, 0.75, g))
    con = (random_masks(2, na, 0.5, g), random_masks(2, nv, 0.5, g))
    with torch.no_grad():
        out = model.student_forward(audio, frames, rec, con)
        assert out.pred_a.shape == (2, na, cfg.patch_dim_a) and out.pred_v.shape == (2, nv, cfg.patch_dim_v)
        assert out.cls_a.shape == out.cls_v.shape == (2, cfg.embed_dim)
        # Same kept sets in another order (guided masks from scores that rank the same set differently).
        def reorder(m, n):
            s = torch.rand(m.ids_keep.shape[0], n, generator=g) - 2.0
            s.scatter_(1, m.ids_keep, torch.rand(m.ids_keep.shape, generator=g) + 2.0)
            return guided_masks(s, 1 - m.num_keep / n, "distinct", g)
        rec2 = (reorder(rec[0], na), reorder(rec[1], nv))
        assert not torch.equal(rec2[0].ids_keep, rec[0].ids_keep)
        out2 = model.student_forward(audio, frames, rec2, con)
        assert torch.allclose(out2.pred_a, out.pred_a, atol=1e-5)
        assert torch.allclose(out2.pred_v, out.pred_v, atol=1e-5)
        # Change one removed audio patch (in both views' removed sets): nothing moves.
        removed = ((rec[0].mask[0] == 1) & (con[0].mask[0] == 1)).nonzero()[0, 0].item()
        f, t = divmod(removed, cfg.audio_grid[1])
        p = cfg.patch_size
        audio3 = audio.clone()
        audio3[0, t * p:(t + 1) * p, f * p:(f + 1) * p] += 5.0
        out3 = model.student_forward(audio3, frames, rec, con)
        assert torch.equal(out3.pred_a, out.pred_a) and torch.equal(out3.cls_a, out.cls_a)
        # Change one kept patch of the contrastive view: the CLS moves.
        kept = con[0].ids_keep[0, 0].item()
        f, t = divmod(kept, cfg.audio_grid[1])
        audio4 = audio.clone()
        audio4[0, t * p:(t + 1) * p, f * p:(f + 1) * p] += 5.0
        assert not torch.allclose(model.student_forward(audio4, frames, rec, con).cls_a[0], out.cls_a[0])


def test_teacher_scores_match_the_ops_reference(model):
    """Scores from the explicit map == tgdp.reference.patch_global_scores on the joint layer's q, k."""
    cfg = model.cfg
    audio, frames = inputs(cfg)
    captured = []
    hook = model.blocks_u[-1].attn.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        t = model.teacher_forward(audio, frames)
        t_raw = model.teacher_forward(audio, frames, renormalize=False, direction="cls_to_patch")
    hook.remove()
    assert t.scores_a.dtype == torch.float32 and t.scores_a.shape == (2, cfg.num_patches_a)
    assert t.scores_v.shape == (2, cfg.num_patches_v)
    assert torch.allclose(t.scores_a.sum(1), torch.ones(2)) and torch.allclose(t.scores_v.sum(1), torch.ones(2))
    blk = model.blocks_u[-1].attn
    for x, want, want_raw in ((captured[0], t.scores_a, t_raw.scores_a), (captured[1], t.scores_v, t_raw.scores_v)):
        b, n, d = x.shape
        qkv = blk.qkv(x).reshape(b, n, 3, blk.num_heads, blk.head_dim).permute(2, 0, 3, 1, 4)
        ref = patch_global_scores(qkv[0], qkv[1], scale=blk.scale, renormalize=True)
        assert torch.allclose(want, ref, rtol=1e-4, atol=1e-7)
        ref_raw = patch_global_scores(qkv[0], qkv[1], scale=blk.scale, direction="cls_to_patch")
        assert torch.allclose(want_raw, ref_raw, rtol=1e-4, atol=1e-7)
    assert torch.all(t_raw.scores_a.sum(1) < 1)                  # the CLS->CLS entry is left out


def test_features_batch_one_and_official_schedule(model):
    cfg = model.cfg
    audio, frames = inputs(cfg, b=2)
    with torch.no_grad():
        fa, fv = model.extract_features(audio, frames)
        t = model.teacher_forward(audio, frames)
        t_off = model.teacher_forward(audio, frames, schedule="official")
        one_a, one_v = model.extract_features(audio[1:], frames[1:])     # batch size 1 works
    assert fa.shape == fv.shape == (2, cfg.embed_dim)
    assert torch.equal(fa, t.cls_a) and torch.equal(fv, t.cls_v) and torch.equal(t_off.scores_a, t.scores_a)
    assert one_a.shape == (1, cfg.embed_dim) and torch.allclose(one_a[0], fa[1], atol=1e-5)
    g = torch.Generator().manual_seed(0)
    rec = (random_masks(2, cfg.num_patches_a, 0.75, g), random_masks(2, cfg.num_patches_v, 0.75, g))
    with torch.no_grad():
        s = model.student_forward(audio, frames, rec, rec)
        s_off = model.student_forward(audio, frames, rec, rec, schedule="official")
    assert torch.equal(s.pred_a, s_off.pred_a) and torch.equal(s.cls_v, s_off.cls_v)
    with pytest.raises(ValueError, match="schedule"):
        model.teacher_forward(audio, frames, schedule="slow")


def test_joint_layers_are_chained():
    torch.manual_seed(0)
    m = CAVMAESync(small_cfg(**{"model.depth": 3, "model.modality_specific_depth": 1})).eval()
    assert len(m.blocks_u) == 2
    audio, frames = inputs(m.cfg)
    with torch.no_grad():
        a, v = m.embed(audio, frames)
        sa, _ = m.encode_specific(a, v, None)
        chained = m.norm_a(m.blocks_u[1](m.blocks_u[0](sa, "a"), "a")[:, 0])
        official_bug = m.norm_a(m.blocks_u[1](sa, "a")[:, 0])
        got = m.extract_features(audio, frames)[0]
    assert torch.allclose(got, chained, atol=1e-6) and not torch.allclose(got, official_bug, atol=1e-3)


def test_reconstruction_gradients_do_not_reach_the_cls_tokens(model):
    cfg = model.cfg
    audio, frames = inputs(cfg)
    g = torch.Generator().manual_seed(0)
    rec = (random_masks(2, cfg.num_patches_a, 0.75, g), random_masks(2, cfg.num_patches_v, 0.75, g))
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        out = model.student_forward(audio, frames, rec, rec, rec_grad_to_cls=flag)
        (out.pred_a.square().mean() + out.pred_v.square().mean()).backward()
        grads = [model.cls_token_a.grad, model.cls_token_v.grad]
        if flag:
            assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)   # official behaviour
        else:
            assert all(gr is None or torch.all(gr == 0) for gr in grads)
        assert model.blocks_a[0].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out = model.student_forward(audio, frames, rec, rec)
    # (a plain sum of a LayerNorm output has zero gradient, so weight it)
    (out.cls_a * torch.randn_like(out.cls_a)).sum().backward()    # the contrastive view trains them
    assert model.cls_token_a.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_bad_masks_and_inputs_raise(model):
    cfg = model.cfg
    audio, frames = inputs(cfg)
    g = torch.Generator().manual_seed(0)
    good = (random_masks(2, cfg.num_patches_a, 0.75, g), random_masks(2, cfg.num_patches_v, 0.75, g))
    wrong_b = (random_masks(3, cfg.num_patches_a, 0.75, g), good[1])
    with pytest.raises(ValueError, match=r"rec\[0\]\.ids_keep"):
        model.student_forward(audio, frames, wrong_b, good)
    with pytest.raises(ValueError, match="T=400"):
        model.extract_features(audio[:, :400], frames)
    with pytest.raises(ValueError, match="direction"):
        model.teacher_forward(audio, frames, direction="both")


def test_meta_and_dtype_construction():
    m = CAVMAESync(small_cfg(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.pos_embed_a.dtype == torch.bfloat16
    meta = CAVMAESync(small_cfg(), device="meta")
    assert meta.pos_embed_a.is_meta and meta.blocks_u[0].attn.qkv.weight.is_meta
