"""Counted training FLOPs (meta device) against a hand count, and the H100 projection arithmetic."""

import pytest

from tgdp.configs import apply_overrides, tiny
from tgdp.perf import AS2M_PAIRS, H100_BF16_PEAK, main, project, train_flops_per_sample

SHAPES = {"model.depth": 2, "model.modality_specific_depth": 1, "model.img_size": 32, "model.audio_length": 64,
          "model.decoder_depth": 1, "train.model_impl": "reference"}


def _block(L: int, D: int, mlp: float = 4.0) -> int:
    """Matmul FLOPs of one pre-norm ViT block on L tokens: qkv 6LD², QKᵀ and AV 4L²D, proj 2LD², MLP 4·mlp·LD²."""
    return 6 * L * D * D + 4 * L * L * D + 2 * L * D * D + int(4 * mlp) * L * D * D


def test_teacher_flops_equal_hand_count():
    cfg = apply_overrides(tiny(), SHAPES)
    m = cfg.model
    D, R, p = m.embed_dim, m.num_register_tokens, m.patch_size
    na, nv = m.num_patches_a, m.num_patches_v
    assert (na, nv) == (32, 4)
    hand = 2 * na * p * p * 1 * D + 2 * nv * p * p * 3 * D            # patch-embed convolutions
    hand += _block(1 + na + R, D) + _block(1 + nv + R, D)                # modality-specific layer
    hand += _block(1 + na, D) + _block(1 + nv, D)                        # joint layer, a-LN and v-LN passes
    f = train_flops_per_sample(cfg, batch=2)
    assert f["teacher"] == hand
    # fwd + bwd of the student is at least 2x... 3x its forward; total = teacher + student
    assert f["total"] == f["teacher"] + f["student_fwd_bwd"]
    assert f["student_fwd_bwd"] > 2 * f["teacher"]


def test_count_is_per_sample():
    cfg = apply_overrides(tiny(), SHAPES)
    one, three = train_flops_per_sample(cfg, batch=1), train_flops_per_sample(cfg, batch=3)
    assert one["teacher"] == three["teacher"]
    # only the contrastive logits grow with the batch: 2·B²·D forward + 4·B²·D backward = 6·B·D per sample
    D = cfg.model.embed_dim
    assert three["total"] - one["total"] == 3 * 2 * (3 - 1) * D


def test_teacher_counted_when_only_masking_needs_it():
    cfg = apply_overrides(tiny(), {**SHAPES, "loss.w_dis": 0.0})
    f = train_flops_per_sample(cfg, batch=1)
    assert f["teacher"] > 0 and f["total"] == f["teacher"] + f["student_fwd_bwd"]
    g = train_flops_per_sample(apply_overrides(cfg, {"masking.guide": "random"}), batch=1)
    assert g["teacher"] == 0 and g["total"] == f["student_fwd_bwd"]


def test_projection_arithmetic():
    # 300 GFLOP/sample, 1.39 M pairs, 40 % of 989 TFLOP/s -> 1.39e6 * 3e11 / 3.956e14 s
    assert project(3e11) == pytest.approx(AS2M_PAIRS * 3e11 / (0.4 * H100_BF16_PEAK))
    assert project(3e11, gpus=8) == pytest.approx(project(3e11) / 8)
    with pytest.raises(ValueError, match="mfu"):
        project(1.0, mfu=0.0)
    with pytest.raises(ValueError, match="gpus"):
        project(1.0, gpus=0)


def test_cli_labels_projection(capsys):
    assert main(["--preset", "tiny", *sum(([f"--{k}", str(v)] for k, v in SHAPES.items()), [])]) == 0
    out = capsys.readouterr().out
    assert "PROJECTION" in out and "8 GPUs" in out and "GFLOP" in out
    assert main(["--preset", "tiny", "--masking.rec_ratio", "1.5"]) == 2
    assert "masking.rec_ratio" in capsys.readouterr().err
