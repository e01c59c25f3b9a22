"""Counted FLOPs (tgdp.flops) against hand counts of the model's matmuls."""

import pytest
import torch
import torch.nn.functional as F

from tgdp.configs import tiny
from tgdp.flops import _counter, compare, count_step_flops, format_table, main


def _block(lengths, d, hidden):
    """Forward FLOPs of one ViT block over sequences of the given lengths (per sample)."""
    t = sum(lengths)
    linear = 2 * t * (d * 3 * d + d * d + 2 * d * hidden)
    attn = sum(4 * n * n * d for n in lengths)  # q k^T and attn @ v, all heads
    return linear + attn


@pytest.fixture(scope="module")
def rows():
    return compare(tiny(), batch=2, device="meta")


def test_fast_teacher_matches_hand_count(rows):
    m = tiny().model
    d, hidden, r, p = m.embed_dim, int(m.embed_dim * m.mlp_ratio), m.num_register_tokens, m.patch_size
    na, nv = m.num_patches_a, m.num_patches_v
    expect = 2 * na * d * p * p + 2 * nv * d * p * p * m.in_chans            # patch-embed convs
    expect += m.modality_specific_depth * (_block([1 + na + r], d, hidden) + _block([1 + nv + r], d, hidden))
    expect += m.joint_depth * _block([1 + na, 1 + nv], d, hidden)            # a-LN + v-LN, no unified
    expect += 2 * (1 + na) * d + 2 * (1 + nv) * d                            # patch . k_cls scores
    assert rows["fast model (packed)"]["teacher"] == expect


def test_official_schedule_waste_is_counted(rows):
    """official - tgdp schedule = the teacher's unified joint pass + the rec view's a/v joint passes
    + the con view's unified joint pass (forward only: their outputs are discarded, so no backward)."""
    cfg = tiny()
    m = cfg.model
    d, hidden = m.embed_dim, int(m.embed_dim * m.mlp_ratio)
    ka = int(m.num_patches_a * (1 - cfg.masking.rec_ratio))
    kv = int(m.num_patches_v * (1 - cfg.masking.rec_ratio))
    ca = int(m.num_patches_a * (1 - cfg.masking.con_ratio))
    cv = int(m.num_patches_v * (1 - cfg.masking.con_ratio))
    waste = m.joint_depth * (_block([m.num_patches_a + m.num_patches_v], d, hidden)
                             + _block([1 + ka], d, hidden) + _block([1 + kv], d, hidden)
                             + _block([ca + cv], d, hidden))
    off, ours = rows["reference, official schedule"], rows["reference, tgdp schedule"]
    assert off["total"] - ours["total"] == waste


def test_fast_does_the_same_useful_work_as_the_reference(rows):
    ref, fast = rows["reference, tgdp schedule"], rows["fast model (packed)"]
    m = tiny().model
    assert fast["student"] == ref["student"]
    # The fast teacher computes its scores with one patch . k_cls product per row (no L x L map).
    assert fast["teacher"] - ref["teacher"] == 2 * (2 + m.num_patches_a + m.num_patches_v) * m.embed_dim
    assert fast["total"] < rows["reference, official schedule"]["total"]
    assert "fast model (packed)" in format_table(rows)


def test_cpu_sdpa_is_counted():
    """FlopCounterMode has no formula for the CPU flash kernels; tgdp.flops adds one."""
    q = torch.randn(2, 3, 5, 4, requires_grad=True)
    with _counter() as fc:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    fwd = 2 * (2 * 2 * 3 * 5 * 5 * 4)
    assert fc.get_total_flops() == fwd + fwd * 5 // 2  # backward recomputes q k^T: 5 matmuls


def test_errors_and_cli(capsys):
    with pytest.raises(ValueError, match="impl='x'"):
        count_step_flops(tiny(), impl="x")
    with pytest.raises(ValueError, match="batch=0"):
        count_step_flops(tiny(), batch=0)
    assert main(["--preset", "nope"]) == 2
    assert "preset='nope'" in capsys.readouterr().err
