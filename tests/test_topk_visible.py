"""tgdp.ops.topk_visible: Triton (interpreter) vs reference, hand-worked orders, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.topk_visible import topk_visible as ref_topk

pytest.importorskip("triton")


def triton_topk(scores, k, tokens=None):
    with ops.force_triton():
        return ops.topk_visible(scores, k, tokens)


def test_hand_worked_example_ties_and_mask_convention():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5]])
    tokens = torch.arange(5.0).reshape(1, 5, 1) * 10
    for ids_keep, ids_restore, mask, visible in (ref_topk(scores, 3, tokens), triton_topk(scores, 3, tokens)):
        # descending, the three tied 0.5s by index, then 0.2 (3), 0.1 (0)
        assert ids_keep.tolist() == [[1, 2, 4]]
        assert ids_restore.tolist() == [[4, 0, 1, 3, 2]]          # argsort of ids_shuffle [1, 2, 4, 3, 0]
        assert mask.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]         # 1 = removed
        assert visible.flatten().tolist() == [10.0, 20.0, 40.0]


CASES = [  # b, n, k, token dim, dtype of tokens
    (1, 197, 1, 8, torch.float32),
    (3, 211, 211, 5, torch.bfloat16),
    (2, 208, 52, 16, torch.float16),
    (2, 300, 75, 3, torch.float32),      # N > one 256 block
]


@pytest.mark.parametrize("b,n,k,d,dtype", CASES)
def test_triton_matches_reference_forward_and_backward(b, n, k, d, dtype):
    scores = (torch.randn(b, n) * 4).round() / 4          # many ties
    scores[0, :3] = float("nan")                            # NaN ranks first, as in torch.sort
    scores[-1, 5], scores[-1, 6] = -0.0, 0.0                # -0 == +0: a tie, kept by index
    # Non-contiguous tokens: a transposed [B, D, N] buffer.
    tokens = torch.randn(b, d, n).to(dtype).transpose(1, 2).requires_grad_(True)
    want = ref_topk(scores, k, tokens)
    got = triton_topk(scores, k, tokens)
    for name, w, g in zip(("ids_keep", "ids_restore", "mask", "visible"), want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name
    grad_out = torch.randn(b, k, d).to(dtype)
    (g_want,) = torch.autograd.grad(want[3], tokens, grad_out)
    (g_got,) = torch.autograd.grad(got[3], tokens, grad_out)
    assert torch.equal(g_got, g_want)                       # a copy: exact at every precision
    removed = got[2].bool()
    assert (g_got[removed] == 0).all()


def test_bf16_scores_are_ranked_like_their_fp32_values():
    scores = torch.randn(2, 64).bfloat16()
    want = ref_topk(scores.float(), 16)
    got = triton_topk(scores, 16)
    for w, g in zip(want[:3], got[:3]):
        assert torch.equal(g, w)


def test_random_masking_equals_official_argsort_of_noise():
    noise = torch.rand(4, 208)
    ids_keep, ids_restore, mask, _ = triton_topk(-noise, 52)
    ids_shuffle = torch.argsort(noise, dim=1)                # official random_masking_unstructured
    assert torch.equal(ids_keep, ids_shuffle[:, :52])
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))
    assert torch.equal(mask.sum(1), torch.full((4,), 208.0 - 52))


def test_without_tokens_and_nan_canaries():
    b, n, d = 2, 37, 6
    buf = torch.full((b + 1, n + 9), float("nan"))
    scores = buf[:b, :n]
    scores.copy_(torch.randn(b, n))
    tbuf = torch.full((b + 1, n + 9, d + 4), float("nan"))
    tokens = tbuf[:b, :n, :d]
    tokens.copy_(torch.randn(b, n, d))
    want = ref_topk(scores.clone(), 10, tokens.clone())
    ids_keep, ids_restore, mask, visible = triton_topk(scores, 10, tokens)
    assert torch.equal(ids_keep, want[0]) and torch.equal(ids_restore, want[1]) and torch.equal(mask, want[2])
    assert torch.isfinite(visible).all() and torch.equal(visible, want[3])
    assert triton_topk(scores, 10)[3] is None


def test_backward_never_reads_past_the_gradient():
    tokens = torch.randn(2, 11, 4, requires_grad=True)
    _, _, mask, visible = triton_topk(torch.randn(2, 11), 3, tokens)
    gbuf = torch.full((3, 5, 7), float("nan"))
    grad = gbuf[:2, :3, :4]
    grad.copy_(torch.ones(2, 3, 4))
    (g,) = torch.autograd.grad(visible, tokens, grad)
    assert torch.equal(g, (1 - mask)[:, :, None].expand(2, 11, 4))


BAD = [
    (lambda s, t: (s[0], 2, None), ValueError, r"scores must be \[B, N\], got shape \(9,\)"),
    (lambda s, t: (s.long(), 2, None), TypeError, "scores must be floating point, got torch.int64"),
    (lambda s, t: (s, 10, None), ValueError, r"k=10 must be in \[1, N=9\] \(scores shape \(4, 9\)\)"),
    (lambda s, t: (s, 0, None), ValueError, r"k=0 must be in \[1, N=9\]"),
    (lambda s, t: (s, 2.0, None), TypeError, "k must be an int, got float"),
    (lambda s, t: (s[:0], 2, None), ValueError, r"empty scores, shape \(0, 9\)"),
    (lambda s, t: (s, 2, t[:, :8]), ValueError, r"tokens must be \[B, N, D\] with B, N = \(4, 9\), got shape \(4, 8, 3\)"),
    (lambda s, t: (s, 2, t[0]), ValueError, r"got shape \(9, 3\)"),
    (lambda s, t: (s, 2, t.to("meta")), ValueError, "tokens on meta but scores on cpu"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
@pytest.mark.parametrize("forced", [False, True])
def test_bad_input_raises_before_compute(make, exc, match, forced):
    args = make(torch.randn(4, 9), torch.randn(4, 9, 3))
    with ops.force_triton(forced), pytest.raises(exc, match=match):
        ops.topk_visible(*args)


def test_random_tie_heavy_rows_match_reference():
    """Fuzz: random sizes (1..300), k, and scores from a 5-value set, so most comparisons are ties."""
    gen = torch.Generator().manual_seed(123)
    for _ in range(12):
        b = int(torch.randint(1, 4, (1,), generator=gen))
        n = int(torch.randint(1, 301, (1,), generator=gen))
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        scores = torch.randint(0, 5, (b, n), generator=gen).float()
        want, got = ref_topk(scores, k), triton_topk(scores, k)
        for w, g in zip(want[:3], got[:3]):
            assert torch.equal(g, w), (b, n, k)
