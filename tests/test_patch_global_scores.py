"""tgdp.ops.patch_global_scores: Triton (interpreter) vs reference vs explicit softmax attention."""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.patch_global_scores import attention_lse
from tgdp.reference.patch_global_scores import patch_global_scores as ref_scores

pytest.importorskip("triton")


def explicit_scores(q, k, scale, g=0, direction="patch_to_cls", dtype=torch.float32):
    """softmax(scale q k^T) built in full, the column (or row) of the global token, head mean."""
    attn = ((q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale).softmax(dim=-1)  # [B, H, L, L]
    col = attn[:, :, :, g] if direction == "patch_to_cls" else attn[:, :, g, :]
    keep = [i for i in range(q.shape[2]) if i != g]
    return col.mean(dim=1)[:, keep].float()


def with_nan_canaries(x, pad=3):
    """The same values as a view into a larger NaN-filled buffer (every dim padded)."""
    buf = torch.full([s + pad for s in x.shape], float("nan"), dtype=x.dtype)
    view = buf[tuple(slice(0, s) for s in x.shape)]
    view.copy_(x)
    return view


def qk_from_qkv(b, h, l, d, dtype=torch.float32):
    """q, k as the attention layer makes them: non-contiguous views of one [B, L, 3, H, d] tensor."""
    qkv = torch.randn(b, l, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


CASES = [  # b, h, l, d, global_index, direction, with_lse, renormalize
    (1, 2, 197, 16, 0, "patch_to_cls", False, False),
    (2, 3, 17, 24, 5, "patch_to_cls", True, True),
    (2, 2, 211, 64, 0, "cls_to_patch", False, False),
    (1, 3, 13, 8, -1, "cls_to_patch", True, False),
]


@pytest.mark.parametrize("b,h,l,d,g,direction,with_lse,renorm", CASES)
def test_triton_matches_reference_fp32(b, h, l, d, g, direction, with_lse, renorm):
    q, k = qk_from_qkv(b, h, l, d)
    scale = d ** -0.5
    lse = attention_lse(q, k, scale) if with_lse else None
    want = ref_scores(q, k, lse, scale=scale, global_index=g, renormalize=renorm, direction=direction)
    with ops.force_triton():
        got = ops.patch_global_scores(q, k, lse, scale=scale, global_index=g, renormalize=renorm,
                                      direction=direction)
    assert got.shape == (b, l - 1) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if renorm:
        torch.testing.assert_close(got.sum(1), torch.ones(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["patch_to_cls", "cls_to_patch"])
def test_reference_and_triton_match_explicit_softmax(direction):
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    want = explicit_scores(q.double(), k.double(), 0.3, direction=direction, dtype=torch.float64)
    torch.testing.assert_close(ref_scores(q, k, scale=0.3, direction=direction), want, atol=1e-6, rtol=1e-5)
    with ops.force_triton():
        got = ops.patch_global_scores(q, k, scale=0.3, direction=direction)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_matches_the_reference_teacher_on_real_activations():
    """q/k captured from the reference model's last joint layer (its own qkv Linear, in the a/v-LN
    teacher passes) give the scores its explicit softmax(QK^T)[:, :, 1:, 0] head mean gives."""
    from tgdp.configs import tiny
    from tgdp.reference.model import CAVMAESync

    cfg = tiny().model
    model = CAVMAESync(cfg).eval()
    audio = torch.randn(1, cfg.audio_length, cfg.n_mels)
    frames = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    attn = model.blocks_u[-1].attn
    qkvs = []
    handle = attn.qkv.register_forward_hook(lambda m, i, o: qkvs.append(o))
    with torch.no_grad():
        teacher = model.teacher_forward(audio, frames, renormalize=False)
    handle.remove()
    assert len(qkvs) == 2                                        # the audio pass, then the video pass
    for qkv, want in zip(qkvs, (teacher.scores_a, teacher.scores_v)):
        b, l, _ = qkv.shape
        q, k, _ = qkv.reshape(b, l, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        with ops.force_triton():
            streamed = ops.patch_global_scores(q, k, scale=attn.scale)
            given = ops.patch_global_scores(q, k, attention_lse(q, k, attn.scale), scale=attn.scale,
                                            renormalize=True)
        assert streamed.shape == want.shape == (1, l - 1)
        assert want.max() - want.min() > 1e3 * 1e-7               # the tolerance below is not vacuous
        torch.testing.assert_close(streamed, want, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(given, want / want.sum(1, keepdim=True), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    q, k = qk_from_qkv(2, 3, 197, 32, dtype)
    scale = 32 ** -0.5
    exact = explicit_scores(q, k, scale, dtype=torch.float64)           # fp32+ reference on the same inputs
    plain = explicit_scores(q, k, scale, dtype=dtype)                   # plain torch at that precision
    with ops.force_triton():
        got = ops.patch_global_scores(q, k, scale=scale)
    torch_err = (plain - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * torch_err + 1e-5


@pytest.mark.parametrize("direction", ["patch_to_cls", "cls_to_patch"])
def test_large_logits_do_not_overflow(direction):
    """Logits up to ~1e3: exp would overflow without the running max of the online softmax."""
    q, k = torch.randn(1, 2, 40, 16) * 8, torch.randn(1, 2, 40, 16) * 8
    want = ref_scores(q, k, scale=1.0, direction=direction)
    with ops.force_triton():
        got = ops.patch_global_scores(q, k, scale=1.0, direction=direction)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_nan_canaries_are_never_read():
    q, k = qk_from_qkv(2, 3, 19, 16)
    lse = attention_lse(q, k, 0.25)
    want = ref_scores(q, k, lse, scale=0.25)
    want_row = ref_scores(q, k, lse, scale=0.25, direction="cls_to_patch")
    qn, kn, lsen = with_nan_canaries(q), with_nan_canaries(k), with_nan_canaries(lse)
    with ops.force_triton():
        streamed = ops.patch_global_scores(qn, kn, scale=0.25)
        given = ops.patch_global_scores(qn, kn, lsen, scale=0.25)
        row = ops.patch_global_scores(qn, kn, scale=0.25, direction="cls_to_patch")
    for got, ref in ((streamed, want), (given, want), (row, want_row)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


BAD = [
    (lambda q, k: dict(q=q[0], k=k[0]), ValueError, r"q must be \[B, H, L, d\], got shape \(3, 7, 8\)"),
    (lambda q, k: dict(q=q, k=k[:, :, :5]), ValueError, r"q \(2, 3, 7, 8\) and k \(2, 3, 5, 8\)"),
    (lambda q, k: dict(q=q.long(), k=k.long()), TypeError, "q must be floating point, got torch.int64"),
    (lambda q, k: dict(q=q, k=k.double()), TypeError, "must share a dtype"),
    (lambda q, k: dict(q=q, k=k.to("meta")), ValueError, "q on cpu but k on meta"),
    (lambda q, k: dict(q=q[:0], k=k[:0]), ValueError, r"empty input, q shape \(0, 3, 7, 8\)"),
    (lambda q, k: dict(q=q, k=k, lse=torch.zeros(2, 3)), ValueError, r"lse must be \[B, H, L\] = \(2, 3, 7\)"),
    (lambda q, k: dict(q=q, k=k, global_index=7), ValueError, "global_index=7 out of range for L=7"),
    (lambda q, k: dict(q=q, k=k, direction="both"), ValueError, "direction='both'"),
    (lambda q, k: dict(q=q[:, :, :1], k=k[:, :, :1]), ValueError, "L=1"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
@pytest.mark.parametrize("forced", [False, True])
def test_bad_input_raises_before_compute(make, exc, match, forced):
    q, k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    kwargs = dict(scale=0.1) | make(q, k)
    with ops.force_triton(forced), pytest.raises(exc, match=match):
        ops.patch_global_scores(**kwargs)
