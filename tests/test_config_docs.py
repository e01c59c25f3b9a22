"""Discoverable config: one doc line per field, --print-config as TOML that loads back, did-you-mean."""

import dataclasses
import tomllib
import typing

import pytest

from tgdp.config_docs import DOCS, SECTIONS
from tgdp.config_io import did_you_mean, field_names, to_toml, type_name
from tgdp.configs import PRESETS, Config, ConfigError, apply_overrides, load, paper, tiny, to_dict


def test_every_field_has_one_doc_line_and_no_doc_is_stale():
    """A field added to tgdp.configs needs its line in tgdp.config_docs (this fails until it has one)."""
    names = set(field_names(paper()))
    assert sorted(names - set(DOCS)) == [], "fields without a doc line in tgdp/config_docs.py"
    assert sorted(set(DOCS) - names) == [], "doc lines for fields that no longer exist"
    sections = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(paper(), f.name))}
    assert set(SECTIONS) == sections
    for name, text in {**DOCS, **SECTIONS}.items():
        assert text and "\n" not in text and "``" not in text and len(text) < 160, name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_print_config_is_commented_toml_that_loads_back(preset, tmp_path):
    cfg = apply_overrides(PRESETS[preset](), {"train.betas": "0.9,0.95", "data.root": 'a "quoted" dir',
                                              "train.lr": 1.5e-4})
    text = to_toml(cfg, {**SECTIONS, **DOCS})
    f = tmp_path / "run.toml"
    f.write_text(text)
    assert load("paper", f) == cfg.validate()                  # the file alone gives the same config
    assert tomllib.loads(text) == to_dict(cfg)
    lines = text.splitlines()
    for name in field_names(cfg):
        sec, _, leaf = name.rpartition(".")
        section = getattr(cfg, sec) if sec else cfg
        idx = next(i for i, line in enumerate(lines) if line.startswith(f"{leaf} = ")
                   and (not sec or lines[:i].count(f"[{sec}]") == 1))
        comment = lines[idx - 1]
        assert comment.startswith("# ") and DOCS[name] in comment, (name, comment)
        if sec:
            hint = typing.get_type_hints(type(section))[leaf]
            default = next(g for g in dataclasses.fields(section) if g.name == leaf).default
            assert comment.startswith(f"# {type_name(hint)}, default "), comment
            printed = comment[len(f"# {type_name(hint)}, default "):].split(": ", 1)[0]
            expect = list(default) if isinstance(default, tuple) else default
            assert tomllib.loads(f"x = {printed}")["x"] == expect, (name, printed)


def test_type_names():
    assert type_name(int) == "int" and type_name(bool) == "bool"
    assert type_name(typing.Literal["a", "b"]) == '"a" | "b"'
    assert type_name(tuple[float, float]) == "2 floats"


def test_train_print_config_and_help(capsys):
    from tgdp.train import main

    assert main(["--print-config", "--preset", "tiny", "--model.depth", "5"]) == 0
    out = capsys.readouterr().out
    parsed = tomllib.loads(out)
    assert parsed["preset"] == "tiny" and parsed["model"]["depth"] == 5
    assert "# int, default 12: encoder depth in total" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "--print-config" in help_text and "--data.root" in help_text and "--demo" in help_text


@pytest.mark.parametrize("typo, expect", [
    ("train.stepz", "train.steps"), ("trian.steps", "train.steps"), ("model.lr", "train.lr"),
    ("loss.w_recon", "loss.w_rec"), ("train.batchsize", "train.batch_size"), ("train.qqq", None),
])
def test_did_you_mean(typo, expect):
    assert did_you_mean(typo, field_names(paper())) == expect
    with pytest.raises(ConfigError) as info:
        apply_overrides(paper(), {typo: "1"})
    msg = str(info.value)
    assert typo in msg and (f"did you mean {expect}?" in msg if expect else "did you mean" not in msg)
    assert len(msg) < 400


def test_did_you_mean_for_presets_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"preset='tinny' is unknown; did you mean tiny\?"):
        load("tinny")
    with pytest.raises(ConfigError, match=r"masking.guide='gumbell' is not a choice; did you mean gumbel\?"):
        apply_overrides(tiny(), {"masking.guide": "gumbell"})


def test_toml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nsteps = 3\nlr = = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML: .*line 3"):
        load("paper", f)
    f.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz is not a config field; did you mean train\.steps\? .*"
                                          r"\(in .*bad\.toml\)"):
        load("paper", f)
