"""Counted training FLOPs (meta device) against a hand count, and the per-op roofline projection."""

import json

import pytest

from tgdp.configs import apply_overrides, tiny
from tgdp.perf import (ALLREDUCE_BUSBW, AS2M_PAIRS, H100_BF16_PEAK, H100_HBM_BW, KERNEL_FLOOR_S, allreduce_seconds,
                       epoch_seconds, main, report, roofline, train_flops_per_sample, verdict)

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


def test_roofline_arithmetic():
    """t_op = max(executed FLOPs / (peak e_c), bytes / (BW e_m), floor), summed per class."""
    calls = [("student", "matmul", 7e11, 7e11, 1e9),          # compute-bound: 7e11 / (0.7 * 989e12)
             ("backward", "attention", 2e9, 2.5e9, 2.68e9),    # memory-bound: 2.68e9 / (0.8 * 3.35e12)
             ("student", "memory", 0, 0, 100),                 # tiny: the 2 us floor
             ("optimizer", "optimizer", 0, 0, 2.68e9)]
    r = roofline(calls, fused_memory_bytes=0, fused_memory_kernels=0)
    c = r["classes"]
    assert c["matmul"]["eager_s"] == pytest.approx(7e11 / (0.7 * H100_BF16_PEAK)) and c["matmul"]["bound"] == "compute"
    assert c["attention"]["eager_s"] == pytest.approx(2.68e9 / (0.8 * H100_HBM_BW))
    assert c["attention"]["bound"] == "memory" and c["attention"]["flops"] == 2e9
    assert c["memory"]["eager_s"] == KERNEL_FLOOR_S and c["memory"]["fused_s"] == 0.0
    assert r["eager_s"] == pytest.approx(sum(x["eager_s"] for x in c.values()))
    assert r["fused_s"] == pytest.approx(r["eager_s"] - KERNEL_FLOOR_S)
    assert r["backward_s"] == c["attention"]["eager_s"] and r["flops"] == 7e11 + 2e9
    slow = roofline(calls, 0, 0, eff={"matmul": (0.35, 0.8)})
    assert slow["classes"]["matmul"]["eager_s"] == pytest.approx(2 * c["matmul"]["eager_s"])
    with pytest.raises(ValueError, match="matmul compute=1.5"):
        roofline(calls, 0, 0, eff={"matmul": (1.5, 0.8)})


def test_epoch_and_allreduce_arithmetic():
    # 1,390,395 pairs // (64 x 8) = 2,715 steps
    assert epoch_seconds(0.05, 64, 8) == pytest.approx(2715 * 0.05)
    assert epoch_seconds(0.05, 64, 8, exposed_comm_s=0.01) == pytest.approx(2715 * 0.06)
    assert epoch_seconds(1.0, 256, 1, pairs=1000) == 3
    assert allreduce_seconds(8e8, 1) == 0.0
    assert allreduce_seconds(8e8, 8) == pytest.approx(8e8 * 2 * 7 / 8 / ALLREDUCE_BUSBW)
    with pytest.raises(ValueError, match="gpus=0"):
        epoch_seconds(1.0, 64, 0)


def test_report_tables_sum_and_bound_the_step():
    cfg = apply_overrides(tiny(), {"train.model_impl": "fast"})
    r = report(cfg, batches=(2, 8))
    for b, row in r["batches"].items():
        cls = row["classes"]
        assert set(cls) == {"matmul", "attention", "fused", "memory", "optimizer"}
        assert row["step_s"]["eager"] == pytest.approx(sum(c["eager_s"] for c in cls.values()))
        assert row["step_s"]["fused"] == pytest.approx(sum(c["fused_s"] for c in cls.values()))
        assert row["step_s"]["fused"] < row["step_s"]["eager"]
        assert cls["memory"]["fused_bytes"] < cls["memory"]["bytes"]
        sizes = [t["bytes"] for t in row["top_ops"]]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] <= sum(c["bytes"] for c in cls.values())
        total = sum(c["flops"] for c in cls.values())
        assert row["flops_per_sample"] == pytest.approx(total / int(b))
        assert row["mfu"]["eager"] == pytest.approx(total / (row["step_s"]["eager"] * H100_BF16_PEAK))
        steps = AS2M_PAIRS // (int(b) * 8)
        assert row["epoch_s"]["fused"]["8"] == pytest.approx(steps * (row["step_s"]["fused"] +
                                                                      row["allreduce_exposed_s"]["8"]))
    # per-sample FLOPs are the same at both batches up to the contrastive logits; a bigger batch
    # amortises the optimizer and the EMA, so the projected epoch is shorter
    assert r["batches"]["8"]["epoch_s"]["eager"]["1"] < r["batches"]["2"]["epoch_s"]["eager"]["1"]
    assert "Design target" in verdict(r)


def test_cli_prints_the_projection(capsys):
    args = ["--preset", "tiny", "--batch", "2", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PROJECTION" in out and "batch 4 per GPU" in out and "on 8 GPUs" in out and "Design target" in out
    assert "most bytes (eager): " in out
    for cls in ("matmul", "attention", "fused", "memory", "optimizer", "total"):
        assert f"  {cls} " in out
    assert main([*args, "--json", "--eff", "matmul=0.5,0.9"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["efficiency"]["matmul"] == [0.5, 0.9] and set(js["batches"]) == {"2", "4"}


@pytest.mark.parametrize("argv, needle", [
    (["--eff", "nope=1,1"], "--eff 'nope=1,1'"),
    (["--eff", "matmul=2,0.8"], "matmul compute=2.0"),
    (["--eff", "memory=-,"], "the memory efficiency is needed"),
    (["--batch", "0"], "--batch [0]"),
    (["--masking.rec_ratio", "1.5"], "masking.rec_ratio"),
])
def test_cli_errors_are_one_line(capsys, argv, needle):
    assert main(["--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tgdp.perf: error: ") and needle in err and err.count("\n") == 1
