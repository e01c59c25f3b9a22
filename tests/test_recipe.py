"""The two presets: paper() pins every published value (with its source), tgdp() deviates only where
listed, tiny() is tgdp() at demo size; the README presets table matches both; Adam with coupled L2 and
the non-finite skip; distillation per eq. 6 and the Gumbel guide from raw scores inside the method;
the official audio windows and padding in paper()."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from tgdp.configs import apply_overrides, paper, tgdp, tiny, to_dict

# Sources (short names): PAPER = the CVPR 2026 paper; SUPP = its supplement (Table 1 = hyper-parameters);
# TGDP = wanglg20/TG-DP (src/models/cavmae_dp.py, src/dataloader_sync.py, src/retrieval.py);
# SYNC-DEV = edsonroteia/cav-mae, the CAV-MAE Sync training scripts (run_cavmae_pretrain_sync.sh,
# cosine_scheduler.py); CAVMAE = YuanGongND/cav-mae (traintest_ft.py, egs/*/run_cavmae_ft*.sh,
# dataloader.py, gen_weight_file.py).
PUBLISHED = [
    # field, paper() value, source
    ("model.audio_length", 416, "SUPP §1.2 (128x416 segments); TGDP retrieval.py '4s' -> 416"),
    ("model.n_mels", 128, "SUPP §1.2 (128-bin log-Mel)"),
    ("model.img_size", 224, "SUPP §1.2 (224x224)"),
    ("model.patch_size", 16, "SUPP §1.2 (16x16 patches)"),
    ("model.embed_dim", 768, "TGDP cavmae_dp.py CAVMAE_DP (ViT-B)"),
    ("model.num_heads", 12, "TGDP cavmae_dp.py CAVMAE_DP"),
    ("model.modality_specific_depth", 11, "TGDP cavmae_dp.py CAVMAE_DP"),
    ("model.depth", 12, "TGDP cavmae_dp.py (12 - modality_specific_depth joint layers)"),
    ("model.decoder_embed_dim", 512, "TGDP cavmae_dp.py CAVMAE_DP"),
    ("model.decoder_depth", 8, "TGDP cavmae_dp.py CAVMAE_DP"),
    ("model.decoder_num_heads", 16, "TGDP cavmae_dp.py CAVMAE_DP"),
    ("model.num_register_tokens", 8, "TGDP retrieval.py (num_register_tokens = 8)"),
    ("model.ln_eps", 1e-5, "TGDP cavmae_dp.py (nn.LayerNorm default)"),
    ("masking.dual_path", True, "PAPER §3.3 (two passes: a reconstruction view and a contrastive view)"),
    ("masking.rec_ratio", 0.75, "PAPER §3.3 (reconstruction branch, 75 %)"),
    ("masking.con_ratio", 0.5, "PAPER §3.3 (contrastive branch, 50 % in our setting)"),
    ("masking.guide", "distinct", "PAPER §3.3 (retains the top-k tokens, deterministic selection)"),
    ("masking.score_direction", "patch_to_cls", "TGDP get_patch2cls_rank (attn[:, :, 1:, 0])"),
    ("masking.renormalize_scores", True, "PAPER §3.3 (normalized across spatial tokens)"),
    ("masking.gumbel_tau", 1.0, "TGDP get_patch2cls_rank (temperature=1.0)"),
    ("loss.w_rec", 1.0, "SUPP §1.3 (Sync loss weights); SYNC-DEV w_mae 1.0"),
    ("loss.w_con", 0.1, "SUPP §1.3 (Sync loss weights); SYNC-DEV w_c 0.1"),
    ("loss.norm_pix_loss", True, "SYNC-DEV norm_pix_loss True"),
    ("loss.temperature", 0.05, "TGDP forward_contrastive (/ 0.05)"),
    ("loss.symmetric", False, "PAPER eq. 4 (video -> audio)"),
    ("loss.dis_normalize", False, "PAPER eq. 6 (plain squared distance)"),
    ("loss.rec_grad_to_cls", True, "TGDP forward_encoder (CLS in the reconstruction pass, not detached)"),
    ("data.frames_per_clip", 16, "SUPP §1.2 (T = 16)"),
    ("data.sample_rate", 16000, "CAVMAE preprocess/extract_audio.py (ffmpeg -ar 16000)"),
    ("data.channels", "first", "CAVMAE preprocess/extract_audio.py (sox remix 1: the first channel)"),
    ("data.fbank_frames", 1024, "TGDP dataloader_sync.py _wav2fbank (target_length = 1024)"),
    ("data.pad", "zero", "TGDP dataloader_sync.py _wav2fbank (ZeroPad2d)"),
    ("data.window", "official", "TGDP dataloader_sync.py map_frame_to_spectrogram"),
    ("data.fbank_mean", -5.081, "SUPP Table 1 (norm mean)"),
    ("data.fbank_std", 4.4849, "SUPP Table 1 (4.485); TGDP retrieval.py (4.4849)"),
    ("train.epochs", 35.0, "SUPP Table 1"),
    ("train.batch_size", 512, "SUPP Table 1 (8 x 64)"),
    ("train.lr", 2e-4, "SUPP Table 1"),
    ("train.warmup_frac", 0.1, "SUPP Table 1 (3.5 of 35 epochs)"),
    ("train.min_lr_ratio", 0.1, "SYNC-DEV cosine_scheduler.py (min_lr = 0.1 lr)"),
    ("train.optimizer", "adam", "SUPP Table 1 (Adam)"),
    ("train.betas", (0.95, 0.999), "SUPP §1.4; SYNC-DEV"),
    ("train.weight_decay", 5e-7, "SYNC-DEV run script (Adam weight_decay 5e-7)"),
    ("train.grad_clip", 0.0, "SYNC-DEV traintest_cavmae_sync.py (no clipping)"),
    ("probe.head", "official", "TGDP cavmae_dp.py CAVMAEFT aggregate='self_attention_cls'"),
    ("probe.depth", 2, "SUPP §1.4 (two-layer head); CAVMAEFT classifier_layers"),
    ("probe.num_heads", 12, "TGDP cavmae_dp.py CAVMAEFT (num_heads=12)"),
    ("probe.task", "multiclass", "SUPP Table 1 VGG LP (CE)"),
    ("probe.lr", 1e-3, "SUPP Table 1 VGG LP"),
    ("probe.epochs", 10, "SUPP Table 1 VGG LP"),
    ("probe.warmup_epochs", 1.0, "SUPP Table 1 VGG LP"),
    ("probe.batch_size", 48, "SUPP Table 1 VGG LP"),
    ("probe.class_balanced", True, "SUPP Table 1 VGG LP"),
    ("probe.wa", True, "SUPP Table 1 VGG LP (weight averaging)"),
    ("probe.optimizer", "adam", "SUPP Table 1 / §1.4"),
    ("probe.betas", (0.95, 0.999), "SUPP §1.4"),
    ("probe.weight_decay", 5e-7, "CAVMAE traintest_ft.py (Adam weight_decay 5e-7)"),
    ("probe.mixup", 0.5, "SUPP Table 1 (Mixup: Yes); CAVMAE run_cavmae_ft*.sh (mixup 0.5)"),
    ("probe.mixup_beta", 10.0, "CAVMAE dataloader.py (np.random.beta(10, 10))"),
    ("probe.label_smooth", 0.1, "CAVMAE run_cavmae_ft*.sh (label_smooth 0.1)"),
    ("probe.wa_start", 3, "CAVMAE run_cavmae_ft*.sh (wa_start 3, wa_end = epochs)"),
    ("probe.wa_end", 0, "CAVMAE run_cavmae_ft*.sh (wa_end = the last epoch)"),
    ("probe.select", "final", "CAVMAE run_cavmae_ft.py (evaluates the weight-averaged model)"),
]

# paper() values nothing publishes: documented assumptions (README "Presets", marked "assumption").
ASSUMED = {"loss.w_dis", "loss.gather", "teacher.momentum", "teacher.schedule", "data.time_shift",
           "probe.min_lr_ratio"}

# Where tgdp() differs from paper(), each listed with its reason in README "Presets".
TGDP_DEVIATIONS = {"loss.dis_normalize": True, "loss.rec_grad_to_cls": False, "data.pad": "floor",
                   "data.window": "frame_time", "data.time_shift": 0.0, "train.optimizer": "adamw"}


def get(cfg, dotted):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k, v in sec.items()}


@pytest.mark.parametrize("field, value, source", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_paper_pins_every_published_value(field, value, source):
    assert get(paper(), field) == value, f"{field} must be {value!r} ({source})"


def test_every_recipe_field_is_published_or_an_assumption():
    # settings of the run environment, not of the recipe
    env = {"model.in_chans", "model.mlp_ratio", "model.attn_backend", "masking.official_compat"}
    env |= {k for k in flat(paper()) if k.split(".")[0] in ("eval",) or k.startswith(("train.", "data."))
            and k.split(".")[1] in ("steps", "precision", "compile", "cuda_graphs", "dist", "fsdp_bf16", "seed",
                                    "out_dir", "ckpt_every", "keep_last", "log_every", "resume", "init",
                                    "model_impl", "root", "demo_dir", "loader", "num_workers", "eval_frame",
                                    "shuffle_buffer", "cache_frames", "host_masks", "overwrite", "dali_threads")}
    env |= {"teacher.momentum_end", "probe.modality", "probe.val_frac", "probe.seed"}
    covered = {p[0] for p in PUBLISHED} | ASSUMED | env
    assert set(flat(paper())) - covered == set(), "a recipe field lacks a source or an assumption"


def test_tgdp_differs_from_paper_only_where_listed():
    p, t = flat(paper()), flat(tgdp())
    assert {k: t[k] for k in t if t[k] != p[k]} == TGDP_DEVIATIONS
    assert paper().preset == "paper" and tgdp().preset == "tgdp"


def test_tiny_is_tgdp_at_demo_size():
    t, base = flat(tiny()), flat(tgdp())
    changed = {k for k in t if t[k] != base[k]}
    sizes = {"model.img_size", "model.embed_dim", "model.depth", "model.modality_specific_depth", "model.num_heads",
             "model.decoder_embed_dim", "model.decoder_depth", "model.decoder_num_heads",
             "model.num_register_tokens", "loss.w_con", "teacher.momentum", "data.num_workers", "data.cache_frames",
             "train.steps", "train.batch_size", "train.lr", "train.ckpt_every", "train.out_dir",
             "eval.retrieval_videos", "eval.batch_videos"}
    assert changed <= sizes
    # the demo's pretraining values (README figures were measured with them)
    c = tiny()
    assert (c.train.steps, c.train.batch_size, c.train.lr, c.train.optimizer, c.loss.w_con, c.loss.w_dis) == \
        (1000, 32, 3e-4, "adamw", 1.0, 0.1)
    assert (c.data.window, c.data.pad, c.data.time_shift, c.loss.dis_normalize, c.loss.rec_grad_to_cls) == \
        ("frame_time", "floor", 0.0, True, False)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def test_readme_presets_table_matches_the_presets():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \| `([^`]*)` \| ([^|]+)\|", readme, re.M)
    seen = {r[0] for r in rows}
    # one row per setting (the model geometry is one summary row)
    assert {p[0] for p in PUBLISHED if not p[0].startswith("model.")} | ASSUMED | set(TGDP_DEVIATIONS) <= seen
    for field, p_val, t_val, source in rows:
        assert (p_val, t_val) == (_fmt(get(paper(), field)), _fmt(get(tgdp(), field))), field
        if field in ASSUMED:
            assert "assumption" in source.lower(), field


# ----------------------------------------------------------------------------- optimizer

def _opt(kind, wd=0.1):
    from tgdp.training.loop import build_optimizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    cfg = apply_overrides(tiny(), {"train.optimizer": kind, "train.weight_decay": wd, "train.lr": 0.01})
    return lin, build_optimizer(lin, cfg)


def test_adam_adds_the_decay_to_the_gradient():
    lin, opt = _opt("adam")
    assert type(opt) is torch.optim.Adam and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.95, 0.999)
    w0 = lin.weight.detach().clone()
    grads = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    m = v = torch.zeros(3, 4, dtype=torch.float64)
    w = w0.double()
    for step, g in enumerate(grads, 1):      # Adam with L2: g + wd * w, bias-corrected moments
        lin.weight.grad = g.clone()
        lin.bias.grad = torch.zeros(3)
        opt.step()
        gg = g.double() + 0.1 * w
        m, v = 0.95 * m + 0.05 * gg, 0.999 * v + 0.001 * gg * gg
        w = w - 0.01 * (m / (1 - 0.95 ** step)) / ((v / (1 - 0.999 ** step)).sqrt() + 1e-8)
    torch.testing.assert_close(lin.weight.detach().double(), w, atol=1e-6, rtol=1e-6)


def test_adamw_is_selectable_and_decoupled():
    lin, opt = _opt("adamw")
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    w0 = lin.weight.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.zeros(3, 4), torch.zeros(3)
    opt.step()   # zero gradient: only the decoupled decay moves the weights, by lr * wd * w
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.01 * 0.1))
    lin2, opt2 = _opt("adam")
    lin2.weight.grad, lin2.bias.grad = torch.zeros(3, 4), torch.zeros(3)
    opt2.step()  # coupled: the decay goes through Adam's normalisation, a step of ~lr per element
    torch.testing.assert_close((w0 - lin2.weight.detach()).abs(), torch.full((3, 4), 0.01), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_optimizer_skips_a_non_finite_step_on_cpu(kind):
    """train_step sets optimizer.found_inf = 1 for a non-finite loss/grad: params, moments and the
    step count stay as they were; found_inf = 0 takes the step."""
    lin, opt = _opt(kind)
    lin.weight.grad, lin.bias.grad = torch.ones(3, 4), torch.ones(3)
    opt.grad_scale = None
    opt.found_inf = torch.zeros(())
    opt.step()
    before = {k: x.clone() for k, x in lin.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    lin.weight.grad = torch.full((3, 4), float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    for k, x in lin.state_dict().items():
        assert torch.equal(x, before[k]), k
    for k, x in opt.state[lin.weight].items():
        assert torch.equal(x, state[k]), k
    opt.found_inf = torch.zeros(())
    lin.weight.grad = torch.ones(3, 4)
    opt.step()
    assert not torch.equal(lin.weight, before["weight"]) and float(opt.state[lin.weight]["step"]) == 2


def test_training_loop_with_the_paper_recipe_skips_a_non_finite_step(tmp_path):
    """train_step with paper()'s optimizer and loss settings (Adam + L2, CLS trained by reconstruction,
    eq. 6): a NaN loss leaves student, teacher and Adam state untouched; the next step trains."""
    from test_train import CPU, _snapshot, small_cfg
    from tgdp.training.loop import train_step
    from tgdp.training.trainer import Trainer

    p = paper()
    over = {"train.optimizer": p.train.optimizer, "loss.dis_normalize": p.loss.dis_normalize,
            "loss.rec_grad_to_cls": p.loss.rec_grad_to_cls}
    tr = Trainer(small_cfg(tmp_path, **over), CPU, progress=False)
    assert type(tr.optimizer) is torch.optim.Adam and tr.optimizer.param_groups[0]["fused"]
    s, batch = tr.state, tr.source.next()
    train_step(s, batch, 0)
    before, real = _snapshot(tr), s.forward
    def nan_forward(*a, **k):
        out = real(*a, **k)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    s.forward = nan_forward
    train_step(s, batch, 1)
    after = _snapshot(tr)
    for b, a in zip(before[:2], after[:2]):
        assert all(torch.equal(b[k], a[k]) for k in b)
    for k in before[2]:
        assert all(torch.equal(before[2][k][kk], after[2][k][kk]) for kk in before[2][k])
    assert s.skipped_total.item() == 1
    s.forward = real
    train_step(s, batch, 2)
    assert not torch.equal(before[0]["cls_token_a"], tr.method.student.state_dict()["cls_token_a"])


# ----------------------------------------------------------------------------- method: eq. 6 and the Gumbel guide

SMALL = {"model.depth": 3, "model.modality_specific_depth": 2, "model.decoder_depth": 1}


def _method(**over):
    from tgdp.method import TGDP

    cfg = apply_overrides(tiny(), {**SMALL, **over}).validate()
    torch.manual_seed(0)
    return TGDP(cfg).eval()


def _inputs(cfg, b=3):
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    return (torch.randn(b, m.audio_length, m.n_mels, generator=g),
            torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=g))


def test_paper_distillation_is_equation_6():
    """L_dis = ||g_v - ĝ_v||² + ||g_a - ĝ_a||² on the raw globals (mean over the batch)."""
    method = _method(**{"loss.dis_normalize": paper().loss.dis_normalize})
    audio, frames = _inputs(method.cfg)
    with torch.no_grad():
        out = method(audio, frames, torch.Generator().manual_seed(1))
        s = method.student.student_forward(audio, frames, out.masks_rec, out.masks_con,
                                           rec_grad_to_cls=method.cfg.loss.rec_grad_to_cls)
        t = method.teacher.module.teacher_forward(audio, frames)
    want = ((s.cls_v - t.cls_v) ** 2).sum(1) + ((s.cls_a - t.cls_a) ** 2).sum(1)
    torch.testing.assert_close(out.loss_dis, want.mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 1e-3])
def test_gumbel_guide_samples_from_the_raw_teacher_scores(tau, monkeypatch):
    """TG-DP prob mode on the teacher's raw head-mean patch->CLS scores, whatever renormalize_scores says."""
    from test_masking import official_prob_ranks

    method = _method(**{"masking.guide": "gumbel", "masking.renormalize_scores": True, "masking.gumbel_tau": tau})
    cfg = method.cfg
    audio, frames = _inputs(cfg)
    b, na, nv = 3, cfg.model.num_patches_a, cfg.model.num_patches_v
    calls, real = [], method.teacher.module.teacher_forward
    monkeypatch.setattr(method.teacher.module, "teacher_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    with torch.no_grad():
        out = method(audio, frames, torch.Generator().manual_seed(4))
        raw = real(audio, frames, renormalize=False)
    assert calls[0]["renormalize"] is False
    g = torch.Generator().manual_seed(4)
    torch.rand(b, na, generator=g), torch.rand(b, nv, generator=g)     # the reconstruction masks' draws
    u_a, u_v = torch.rand(b, na, generator=g), torch.rand(b, nv, generator=g)
    assert torch.equal(out.masks_con[0].ids_keep, official_prob_ranks(raw.scores_a, u_a, tau)[:, :na // 2])
    assert torch.equal(out.masks_con[1].ids_keep, official_prob_ranks(raw.scores_v, u_v, tau)[:, :nv // 2])


def test_distinct_guide_is_the_same_with_and_without_renormalisation():
    outs = []
    for flag in (True, False):
        method = _method(**{"masking.renormalize_scores": flag})
        with torch.no_grad():
            outs.append(method(*_inputs(method.cfg), torch.Generator().manual_seed(2)).masks_con)
    for m1, m2 in zip(*outs):
        assert torch.equal(m1.ids_keep, m2.ids_keep)


# ----------------------------------------------------------------------------- data: the official pipeline

def test_paper_audio_windows_are_the_official_ones():
    from tgdp.data.windows import pad_or_cut, window_starts

    d = paper().data
    starts = window_starts(torch.arange(16), mode=d.window, total=d.fbank_frames, length=416)
    # spec §5.2: centre round(i * 1024 / 16) = 64 i, start = max(0, centre - 208), clamped to 1024 - 416
    want = [min(max(0, 64 * i - 208), 1024 - 416) for i in range(16)]
    assert starts.tolist() == want
    fb = torch.randn(1, 998, 128)
    padded = pad_or_cut(fb, d.fbank_frames, pad=d.pad)
    assert padded.shape == (1, 1024, 128) and torch.all(padded[0, 998:] == 0.0)   # log-Mel 0 (official)
    assert int(d.time_shift * 416) == 208    # roll drawn from U{-208..208}: every offset of the window


def test_presets_load_by_name():
    from tgdp.configs import load

    assert load("tgdp") == tgdp() and load("paper") == paper()
    assert dataclasses.replace(tgdp(), preset="paper") != paper()
