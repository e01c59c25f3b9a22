"""Packed varlen attention (tgdp.model.attention) against per-sequence attention."""

import math

import pytest
import torch

from tgdp.model.attention import resolve_backend, varlen_attention
from tgdp.model.packing import gather_rows, split_groups, view_layout

# Mixed lengths, including single-token sequences and a lone sequence between groups.
VIEWS = [(2, 5), (1, 1), (3, 7), (2, 1), (1, 13)]


def _per_sequence(q, k, v, lengths, scale):
    """Independent reference: loop over sequences, explicit softmax in float64."""
    outs, lses, s = [], [], 0
    for n in lengths:
        qs, ks, vs = (t[s:s + n].double().transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        logits = qs @ ks.transpose(1, 2) * scale
        outs.append((logits.softmax(-1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(logits, -1))  # [H, n]
        s += n
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _inputs(h=3, d=8, dtype=torch.float32):
    lengths = [n for c, n in VIEWS for _ in range(c)]
    total = sum(lengths)
    g = torch.Generator().manual_seed(1)
    qkv = [torch.randn(total, h, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]
    return qkv, lengths


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_varlen_matches_per_sequence_forward_backward(backend, return_lse):
    (q, k, v), lengths = _inputs()
    meta = view_layout(VIEWS, "cpu")
    scale = 8 ** -0.5
    out, lse = varlen_attention(q, k, v, meta, scale=scale, backend=backend, return_lse=return_lse)
    ref_q, ref_k, ref_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _per_sequence(ref_q, ref_k, ref_v, lengths, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if return_lse:
        assert lse is not None and lse.shape == (q.shape[1], q.shape[0])
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    else:
        assert lse is None
    # A length-1 sequence attends only to itself: its output is exactly its value row.
    one = meta.groups[1].start
    torch.testing.assert_close(out[one], v[one], atol=1e-6, rtol=0)
    grad = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), grad.double())
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_sequences_do_not_leak():
    """Changing one sequence's keys/values must not change any other sequence's output."""
    (q, k, v), _ = _inputs()
    meta = view_layout(VIEWS, "cpu")
    out, _ = varlen_attention(q, k, v, meta, scale=0.3)
    g = meta.groups[2]
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[g.start:g.start + g.length] += 5.0  # first sequence of group 2 only
    v2[g.start:g.start + g.length] -= 3.0
    out2, _ = varlen_attention(q, k2, v2, meta, scale=0.3)
    changed = (out2 - out).abs().amax(dim=(1, 2)) > 0
    expect = torch.zeros(q.shape[0], dtype=torch.bool)
    expect[g.start:g.start + g.length] = True
    assert torch.equal(changed, expect)


def test_layout_cu_seqlens_and_cache():
    meta = view_layout(VIEWS, "cpu")
    lengths = [n for c, n in VIEWS for _ in range(c)]
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.cu_seqlens.tolist() == [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    assert meta.max_seqlen == 13 and meta.total == sum(lengths)
    assert view_layout(list(VIEWS), torch.device("cpu")) is meta  # built once, reused
    x = torch.arange(meta.total)
    parts = split_groups(x, meta)
    assert [tuple(p.shape) for p in parts] == [(c, n) for c, n in VIEWS]
    assert torch.equal(torch.cat([p.flatten() for p in parts]), x)


def test_gather_rows():
    x = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    ids = torch.tensor([[3, 0], [1, 2]])
    assert gather_rows(x, ids).tolist() == [[x[0, 3].tolist(), x[0, 0].tolist()],
                                            [x[1, 1].tolist(), x[1, 2].tolist()]]


def test_resolve_backend_and_errors():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("math", "cpu") == "math"
    with pytest.raises(ValueError, match="attn_backend='flash'"):
        resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match="attn_backend='bogus'"):
        resolve_backend("bogus", "cpu")
    with pytest.raises(ValueError, match=r"count=0"):
        view_layout([(0, 3)], "cpu")
    (q, k, v), _ = _inputs()
    meta = view_layout(VIEWS, "cpu")
    with pytest.raises(ValueError, match="packed length"):
        varlen_attention(q[:-1], k[:-1], v[:-1], meta, scale=1.0)
    with pytest.raises(ValueError, match=r"\[total, H, d\]"):
        varlen_attention(q, k[:, :2], v, meta, scale=1.0)
    with pytest.raises(ValueError, match="backend='nope'"):
        varlen_attention(q, k, v, meta, scale=1.0, backend="nope")


def test_math_and_sdpa_agree_in_float64():
    (q, k, v), _ = _inputs(dtype=torch.float64)
    meta = view_layout(VIEWS, "cpu")
    a, la = varlen_attention(q, k, v, meta, scale=1 / math.sqrt(8), backend="math", return_lse=True)
    b, lb = varlen_attention(q, k, v, meta, scale=1 / math.sqrt(8), backend="sdpa", return_lse=True)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(la, lb.double(), atol=1e-6, rtol=1e-6)
