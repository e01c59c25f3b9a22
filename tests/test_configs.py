"""Typed configs: presets, TOML + dotted overrides, clear errors naming the field."""

import dataclasses

import pytest

from tgdp import configs
from tgdp.configs import ConfigError, apply_overrides, from_dict, load, paper, tgdp, tiny, to_dict


def test_paper_preset_is_the_evaluated_model():
    m = paper().model
    assert (m.embed_dim, m.num_heads, m.depth, m.modality_specific_depth, m.joint_depth) == (768, 12, 12, 11, 1)
    assert (m.audio_length, m.n_mels, m.audio_grid, m.num_patches_a) == (416, 128, (8, 26), 208)
    assert (m.img_size, m.num_patches_v, m.num_register_tokens) == (224, 196, 8)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    c = paper()
    assert (c.masking.rec_ratio, c.masking.con_ratio) == (0.75, 0.5)
    assert c.loss.temperature == 0.05 and c.teacher.momentum == 0.999 and c.teacher.schedule == "constant"
    assert c.loss.rec_grad_to_cls is True and tgdp().loss.rec_grad_to_cls is False   # tests/test_recipe.py pins the rest


def test_tiny_keeps_the_structure():
    t, p = tiny().model, paper().model
    assert t.joint_depth >= 1 and t.num_register_tokens >= 1
    assert t.audio_grid == p.audio_grid  # same audio geometry, smaller widths
    assert t.embed_dim < p.embed_dim and t.img_size < p.img_size


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper().model.depth = 3


def test_toml_then_dotted_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny"\n[model]\ndepth = 5\n[loss]\nsymmetric = true\n[train]\nbetas = [0.9, 0.95]\n')
    cfg = load("paper", f, ["--model.depth", "6", "--masking.guide=gumbel", "--loss.w_con", "0.5"])
    assert cfg.preset == "tiny" and cfg.model.embed_dim == tiny().model.embed_dim
    assert cfg.model.depth == 6                      # CLI wins over the file
    assert cfg.loss.symmetric is True and cfg.masking.guide == "gumbel" and cfg.loss.w_con == 0.5
    assert cfg.train.betas == (0.9, 0.95)


def test_dict_round_trip():
    cfg = apply_overrides(tiny(), {"model.depth": 5, "loss.rec_grad_to_cls": "true"})
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, match", [
    ({"model.dept": 4}, "model.dept"),                       # unknown field
    ({"modle.depth": 4}, "modle.depth"),                     # unknown section
    ({"model.depth": "four"}, "model.depth"),                # not an int
    ({"masking.guide": "topk"}, "masking.guide"),            # not a choice
    ({"loss.symmetric": "maybe"}, "loss.symmetric"),         # not a bool
])
def test_unknown_keys_and_bad_types_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        apply_overrides(paper(), override)


@pytest.mark.parametrize("override, match", [
    ({"model.audio_length": 417}, "model.audio_length"),
    ({"model.embed_dim": 100}, "model.embed_dim"),
    ({"masking.rec_ratio": 1.0}, "masking.rec_ratio"),
    ({"loss.temperature": 0}, "loss.temperature"),
    ({"teacher.momentum": 1.5}, "teacher.momentum"),
    ({"model.modality_specific_depth": 12}, "model.modality_specific_depth"),
])
def test_invalid_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        apply_overrides(paper(), override).validate()


def test_unknown_toml_key_is_an_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[loss]\nw_recon = 2.0\n")
    with pytest.raises(ConfigError, match=r"loss\.w_recon"):
        load("paper", f)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="preset"):
        configs.load("huge")
