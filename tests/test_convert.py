"""Checkpoint import/export with the official key layout (spec §8.1)."""

import pytest
import torch

from tgdp import convert
from tgdp.configs import apply_overrides, tiny
from tgdp.masking import random_masks
from tgdp.reference.model import CAVMAESync

OVER = {"model.depth": 2, "model.modality_specific_depth": 1, "model.decoder_depth": 1}


def cfg():
    return apply_overrides(tiny(), OVER).validate()


def build(seed):
    torch.manual_seed(seed)
    return CAVMAESync(cfg().model).eval()


def official_from(model):
    """Our weights laid out as an official DDP checkpoint: 'module.' keys plus unused contrastive heads."""
    sd = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    d = model.cfg.embed_dim
    sd["module.constrative_head_audio.0.norm1.weight"] = torch.ones(d)
    sd["module.constrative_head_visual.1.mlp.fc2.bias"] = torch.zeros(d)
    return sd


def outputs(model):
    c = model.cfg
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2, c.audio_length, c.n_mels, generator=g)
    frames = torch.randn(2, c.in_chans, c.img_size, c.img_size, generator=g)
    rec = (random_masks(2, c.num_patches_a, 0.75, g), random_masks(2, c.num_patches_v, 0.75, g))
    with torch.no_grad():
        s = model.student_forward(audio, frames, rec, rec)
        t = model.teacher_forward(audio, frames)
    return [s.pred_a, s.pred_v, s.cls_a, s.cls_v, t.scores_a, t.cls_v]


def test_official_layout_loads_strictly_and_reproduces_outputs(tmp_path):
    src, dst = build(0), build(1)
    assert not torch.equal(outputs(src)[0], outputs(dst)[0])
    path = tmp_path / "official.pth"
    torch.save({"model": official_from(src), "epoch": 3}, path)       # nested wrapper, from a file
    rep = convert.load_official(dst, path)
    assert sorted(rep.dropped) == ["constrative_head_audio.0.norm1.weight",
                                   "constrative_head_visual.1.mlp.fc2.bias"]
    assert rep.missing == [] and rep.unexpected == []
    assert all(d == 0.0 for d in rep.pos_max_diff.values()) and len(rep.pos_max_diff) == 4
    for a, b in zip(outputs(src), outputs(dst)):
        assert torch.equal(a, b)


def test_without_module_prefix_and_export_round_trip():
    src, dst = build(0), build(1)
    exported = convert.to_official(src)
    assert all(k.startswith("module.") for k in exported) and "module.blocks_u.0.attn.qkv.weight" in exported
    plain = convert.to_official(src, module_prefix=False)
    assert set(plain) == set(src.state_dict())
    convert.load_official(dst, {"state_dict": plain})
    assert torch.equal(outputs(src)[2], outputs(dst)[2])


def test_wrong_or_missing_key_is_named():
    src = build(0)
    sd = official_from(src)
    sd["module.blocks_a.0.attn.qkv.weightt"] = sd.pop("module.blocks_a.0.attn.qkv.weight")
    with pytest.raises(ValueError, match=r"missing keys 1 \(blocks_a\.0\.attn\.qkv\.weight\).*"
                                         r"unexpected keys 1 \(blocks_a\.0\.attn\.qkv\.weightt\)"):
        convert.load_official(build(1), sd)
    sd = official_from(src)
    del sd["module.norm_a.bias"]
    with pytest.raises(ValueError, match=r"norm_a\.bias"):
        convert.load_official(build(1), sd)
    rep = convert.load_official(build(1), sd, strict=False)          # non-strict lists what it skipped
    assert rep.missing == ["norm_a.bias"]


def test_geometry_checks_name_the_key():
    src = build(0)
    sd = official_from(src)
    sd["module.register_tokens"] = torch.zeros(6, src.cfg.embed_dim)
    with pytest.raises(ValueError, match=r"register_tokens has 6 rows, expected 2R = 4"):
        convert.load_official(build(1), sd)
    sd = official_from(src)
    sd["module.pos_embed_a"] = torch.zeros(1, 512, src.cfg.embed_dim)  # a 1024-frame checkpoint
    with pytest.raises(ValueError, match=r"pos_embed_a shape \(1, 512, 96\)"):
        convert.load_official(build(1), sd)
    sd = official_from(src)
    sd["module.decoder_pred_a.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"decoder_pred_a\.weight: checkpoint \(3, 3\)"):
        convert.load_official(build(1), sd)


def test_not_a_state_dict():
    with pytest.raises(ValueError, match="no tensors"):
        convert.read_state_dict({"epoch": 3})
    with pytest.raises(ValueError, match="list"):
        convert.read_state_dict([1, 2])


def test_select_prefix_reads_a_tgdp_checkpoint():
    src = build(0)
    sd = {"student." + k: v for k, v in src.state_dict().items()}
    sd.update({"teacher.module." + k: torch.zeros_like(v) for k, v in src.state_dict().items()})
    dst = build(1)
    convert.load_official(dst, sd, select="student.")
    assert torch.equal(outputs(src)[3], outputs(dst)[3])


def test_long_key_lists_are_counted_not_listed():
    """A state dict of another model: thousands of keys become a count and the first three."""
    sd = {f"encoder.layer.{i}.weight": torch.zeros(1) for i in range(3000)}
    with pytest.raises(ValueError) as info:
        convert.load_official(build(1), sd)
    msg = str(info.value)
    assert len(msg) < 600 and "unexpected keys 3000 (first 3: encoder.layer.0.weight" in msg
    assert f"missing keys {len(build(1).state_dict())} (first 3:" in msg


def _args():
    return ["--preset", "tiny", *[x for k, v in OVER.items() for x in (f"--{k}", str(v))]]


def test_import_writes_a_tgdp_checkpoint_that_eval_and_init_accept(tmp_path, capsys):
    from tgdp.eval import common
    from tgdp.training.checkpoint import read_checkpoint

    src = build(0)
    official = tmp_path / "official.pth"
    torch.save(official_from(src), official)
    ours = tmp_path / "ours.pt"
    assert convert.main(["import", str(official), str(ours), *_args()]) == 0
    assert "set aside 2 contrastive-head keys" in capsys.readouterr().out
    ck = read_checkpoint(ours)
    assert set(ck) == {"model", "config", "provenance", "official_extra"}
    prov = ck["provenance"]
    import hashlib
    assert prov["source"] == str(official.resolve())
    assert prov["source_sha256"] == hashlib.sha256(official.read_bytes()).hexdigest()
    assert prov["module_prefix"] is True and len(prov["dropped"]) == 2
    assert ck["config"] == convert_cfg_dict()
    # tgdp.eval reads it (model + config) and gets the official weights
    model, ecfg = common.load_checkpoint(ours, model_factory=lambda c: CAVMAESync(c.model))
    assert ecfg.model == cfg().model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    # --train.init reads it too (load_official unwraps "model")
    dst = build(1)
    convert.load_official(dst, ours)
    assert torch.equal(outputs(src)[0], outputs(dst)[0])


def convert_cfg_dict():
    from tgdp.configs import to_dict
    return to_dict(cfg())


def test_round_trip_official_tgdp_official_is_bit_exact(tmp_path, capsys):
    """official -> import -> export (no --preset: the config comes from the checkpoint) -> the same
    keys, dtypes and bytes, heads and ``module.`` prefix included; also without the prefix."""
    src = build(0)
    for prefix in (True, False):
        sd = official_from(src)
        sd["module.pos_embed_a"] = sd["module.pos_embed_a"] + 1e-3      # checkpoint tables travel as stored
        sd["module.norm_a.weight"] = sd["module.norm_a.weight"].double()  # dtypes travel too
        if not prefix:
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
        official = tmp_path / f"official{prefix}.pth"
        torch.save(sd, official)
        ours, back = tmp_path / f"ours{prefix}.pt", tmp_path / f"back{prefix}.pth"
        assert convert.main(["import", str(official), str(ours), *_args()]) == 0
        assert convert.main(["export", str(ours), str(back)]) == 0
        got = torch.load(back, weights_only=True)
        assert sorted(got) == sorted(sd)
        for k, v in sd.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert "official layout" in capsys.readouterr().out
    assert not list(tmp_path.glob(".tmp-*"))                          # atomic writes leave no temp file


def test_export_of_a_training_checkpoint_and_its_teacher(tmp_path):
    from tgdp.configs import to_dict
    from tgdp.training.checkpoint import write_checkpoint

    student, teacher = build(0), build(1)
    write_checkpoint({"model": student.state_dict(), "teacher": teacher.state_dict(), "config": to_dict(cfg()),
                      "step": 3}, tmp_path / "step.pt")
    for weights, model in (("model", student), ("teacher", teacher)):
        out = tmp_path / f"{weights}.pth"
        assert convert.main(["export", str(tmp_path / "step.pt"), str(out), "--weights", weights, "--no-module"]) == 0
        got = torch.load(out, weights_only=True)
        assert set(got) == set(model.state_dict())
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_export_of_a_bare_state_dict_needs_the_geometry(tmp_path, capsys):
    torch.save(build(0).state_dict(), tmp_path / "bare.pt")
    assert convert.main(["export", str(tmp_path / "bare.pt"), str(tmp_path / "o.pth")]) == 2
    assert "stores no config" in capsys.readouterr().err
    assert convert.main(["export", str(tmp_path / "bare.pt"), str(tmp_path / "o.pth"), *_args()]) == 0
