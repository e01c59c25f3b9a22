"""tgdp.opcount + tgdp.roofline: the per-op counter against hand-counted FLOPs and bytes (meta device)."""

import pytest
import torch
import torch.nn.functional as F

from tgdp.configs import tiny
from tgdp.flops import count_step_flops
from tgdp.model.attention import SegmentGroup, VarlenMeta
from tgdp.opcount import OP_CLASSES, MetaAutocast, OpCounter
from tgdp.roofline import count_train_step, counting_standins

F32, BF16 = 4, 2


def meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def test_matmul_flops_and_bytes():
    a, b = meta(6, 5), meta(5, 7)
    with OpCounter() as c:
        a @ b
    n = c.count
    assert n.ops["matmul"] == 1 and n.flops["matmul"] == 2 * 6 * 5 * 7
    assert n.bytes["matmul"] == (6 * 5 + 5 * 7 + 6 * 7) * F32
    assert sum(n.ops.values()) == 1


def test_layer_norm_bytes():
    """native_layer_norm reads x, weight, bias and writes y, mean and rstd (one per row)."""
    r, d = 10, 16
    x, w, b = meta(r, d), meta(d), meta(d)
    with OpCounter() as c:
        F.layer_norm(x, (d,), w, b)
    n = c.count
    assert n.ops == {**dict.fromkeys(OP_CLASSES, 0), "memory": 1}
    assert n.bytes["memory"] == (r * d + 2 * d) * F32 + (r * d + 2 * r) * F32
    assert n.total_flops == 0                         # elementwise work is not counted as FLOPs (MFU)


def test_views_are_free_and_broadcast_read_once():
    x, bias = meta(8, 4), meta(4)
    with OpCounter() as c:
        y = x.view(4, 8).t().reshape(8, 4).unsqueeze(0)[0]
        z = y + bias                                   # bias is broadcast over 8 rows: read once
    assert sum(c.count.ops.values()) == 1
    assert c.count.bytes["memory"] == (8 * 4 + 4 + 8 * 4) * F32
    assert z.shape == (8, 4)


def test_inplace_reads_and_writes_and_overwrite_only_writes():
    x, y = meta(3, 5), meta(3, 5)
    with OpCounter() as c:
        x.add_(y)
    assert c.count.bytes["memory"] == 3 * 15 * F32       # read x, read y, write x
    with OpCounter() as c:
        x.copy_(y)
    assert c.count.bytes["memory"] == 2 * 15 * F32       # read y, write x (x is not read)


def test_perfect_fusion_bound():
    """x -> *2 -> relu -> +1 -> matmul: eager moves every intermediate; fused reads x once and
    writes only the tensor the matmul consumes."""
    x, w = meta(32, 16), meta(16, 8)
    with OpCounter() as c:
        c.phase = "student"
        z = (x * 2).relu() + 1
        z @ w
    n = c.count
    t = 32 * 16 * F32
    assert n.bytes["memory"] == 3 * 2 * t
    assert n.fused_memory_bytes == t + t
    assert n.fused_memory_kernels == 1


def test_fusion_stops_at_phase_boundaries():
    x = meta(32, 16)
    with OpCounter() as c:
        c.phase = "student"
        y = x * 2
        c.phase = "backward"
        y + 1
    t = 32 * 16 * F32
    # y crosses phases: written once, read once; x read once; the dead result is not written
    assert c.count.fused_memory_bytes == 3 * t


def test_meta_autocast_dtypes_and_weight_cache():
    lin = torch.nn.Linear(16, 8, device="meta")
    frozen = torch.nn.Linear(16, 8, device="meta").requires_grad_(False)
    x = meta(4, 16)
    amp = MetaAutocast()
    with OpCounter() as c, amp:
        h1 = lin(x)
        h2 = lin(x)                                    # student weight: cast once (autocast cache)
        frozen(x)
        frozen(x)                                      # no-grad weight: cast at every use
        ln = F.layer_norm(h1, (8,))
    assert h1.dtype == h2.dtype == torch.bfloat16 and ln.dtype == torch.float32
    casts = c.count.by_op["memory:_to_copy"][0]
    # lin: weight + bias once, x twice; frozen: (weight + bias + x) twice; layer_norm: h1 up-cast once
    assert casts == 2 + 2 + 2 * 3 + 1
    amp.new_step()
    with OpCounter() as c, amp:
        lin(x)
    assert c.count.by_op["memory:_to_copy"][0] == 3


def test_flash_standin_counts_one_kernel_each_way():
    h, d = 2, 8
    meta_layout = VarlenMeta(cu_seqlens=meta(4, dtype=torch.int32), max_seqlen=7,
                             groups=(SegmentGroup(0, 2, 5), SegmentGroup(10, 1, 7)))
    total = 17
    q, k, v = (meta(total, h, d, dtype=torch.bfloat16, grad=True) for _ in range(3))
    counter = OpCounter()
    with counting_standins(counter), counter:
        from tgdp.model import fast
        o, lse = fast.varlen_attention(q, k, v, meta_layout, scale=0.3, return_lse=True)
        counter.phase = "backward"
        o.backward(meta(total, h, d, dtype=torch.bfloat16))
    fwd_flops = 4 * h * d * (2 * 5 * 5 + 7 * 7)
    n = counter.count
    assert n.ops["attention"] == 2
    assert n.flops["attention"] == fwd_flops + 2 * fwd_flops
    att = [call for call in counter.calls if call[1] == "attention"]
    assert att[1][3] == fwd_flops * 5 // 2             # executed: scores recomputed in the backward
    x, l = total * h * d * BF16, h * total * F32
    assert att[0][4] == 4 * x + l                      # Q, K, V -> O, LSE
    dq_acc = total * h * d * F32
    assert att[1][4] == 5 * x + l + (l + dq_acc) + 3 * x + (l + dq_acc)
    assert o.shape == q.shape and lse.shape == (h, total)
    assert q.grad is not None and q.grad.shape == q.shape
    from tgdp.model import attention
    assert fast.varlen_attention is attention.varlen_attention   # restored


def test_masked_mse_standin_kernel_bytes():
    from tgdp import ops
    pred = meta(2, 4, 48, dtype=torch.bfloat16, grad=True)
    imgs, mask = meta(2, 3, 8, 8), meta(2, 4)
    counter = OpCounter()
    with counting_standins(counter), counter:
        loss = ops.masked_mse(pred, imgs, mask, 4, True)
        loss.backward()
    assert counter.count.ops["fused"] == 2
    p, i, m = 2 * 4 * 48 * BF16, 2 * 3 * 8 * 8 * F32, 2 * 4 * F32
    fwd = p + i + m + m + F32                          # reads pred, image, mask; writes partials + loss
    bwd = p + i + m + F32 + p                          # reads them again + grad; writes grad_pred
    assert counter.count.bytes["fused"] == fwd + bwd
    assert pred.grad.shape == pred.shape


def test_training_step_totals_equal_the_flop_counter():
    cfg = tiny()
    count, info = count_train_step(cfg, 3)
    ref = count_step_flops(cfg, "fast", "fast", 3, "meta")
    assert count.total_flops == round(ref["total"] * 3)
    assert info["phase_flops"]["teacher"] == round(ref["teacher"] * 3)
    # class totals are the sums of the recorded kernels
    for i, key in ((2, "flops"), (4, "bytes")):
        for cls in OP_CLASSES:
            assert sum(c[i] for c in info["calls"] if c[1] == cls) == getattr(count, key)[cls]
    assert count.ops["optimizer"] == 2 and count.ops["attention"] > 0 and count.ops["fused"] >= 2
    assert 0 < count.fused_memory_bytes < count.bytes["memory"]
    # fused Adam(W): param, exp_avg, exp_avg_sq read + written, grad and step read (fp32);
    # EMA lerp: teacher read + written, student read, over every parameter
    from tgdp.model import FastCAVMAESync
    every = sum(p.numel() for p in FastCAVMAESync(cfg.model, device="meta").parameters())
    assert count.bytes["optimizer"] == 7 * info["grad_bytes"] + F32 * info["grad_tensors"] + 3 * F32 * every


def test_batch_validation():
    with pytest.raises(ValueError, match="batch=0"):
        count_train_step(tiny(), 0)
