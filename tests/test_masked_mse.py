"""tgdp.ops.masked_mse: Triton (interpreter) vs reference vs a per-patch loop, forward and backward."""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.masked_mse import masked_mse as ref_mse

pytest.importorskip("triton")


def loop_mse(pred, imgs, mask, p, norm_pix):
    """Patch by patch in fp64, cutting each patch out of the image directly (no patchify)."""
    b, c, h, w = imgs.shape
    gw = w // p
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i in range(b):
        for n in range(pred.shape[1]):
            gi, gj = divmod(n, gw)
            t = imgs[i, :, gi * p:(gi + 1) * p, gj * p:(gj + 1) * p].double().permute(1, 2, 0).reshape(-1)
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            total = total + mask[i, n].double() * ((pred[i, n].double() - t) ** 2).mean()
            count = count + mask[i, n].double()
    return total / count


def triton_mse(*args):
    with ops.force_triton():
        return ops.masked_mse(*args)


def audio_case(b=2, t=64, f=32, p=8):
    """fbank [B, T, F] viewed as the non-contiguous image [B, 1, F, T] (audio_as_image)."""
    imgs = torch.randn(b, t, f).transpose(1, 2).unsqueeze(1)
    return imgs, p


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reference_and_triton_match_per_patch_loop(norm_pix):
    imgs = torch.randn(2, 3, 8, 12)
    pred = torch.randn(2, 6, 48)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1]])
    want = loop_mse(pred, imgs, mask, 4, norm_pix).float()
    torch.testing.assert_close(ref_mse(pred, imgs, mask, 4, norm_pix), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(triton_mse(pred, imgs, mask, 4, norm_pix), want, atol=1e-5, rtol=1e-5)


def make_case(kind):
    if kind == "audio_view":                       # non-contiguous, C = 1
        imgs, p = audio_case()
    elif kind == "prime_n":                        # N = 197 patches in one row, B = 1
        imgs, p = torch.randn(1, 1, 2, 2 * 197), 2
    elif kind == "video":                          # C = 3, channels-last memory
        imgs, p = torch.randn(2, 3, 12, 20).to(memory_format=torch.channels_last), 4
    else:
        raise AssertionError(kind)
    b, c, h, w = imgs.shape
    n, dim = (h // p) * (w // p), p * p * c
    return imgs, p, torch.randn(b, n, dim), (torch.rand(b, n) < 0.75)


@pytest.mark.parametrize("kind", ["audio_view", "prime_n", "video"])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_triton_matches_reference_fp32(kind, norm_pix, mask_dtype):
    imgs, p, pred, mask = make_case(kind)
    mask = mask.to(mask_dtype)
    mask[0, 0] = True                              # at least one masked patch
    pred_ref = pred.clone().requires_grad_(True)
    pred_tri = pred.clone().requires_grad_(True)
    want = ref_mse(pred_ref, imgs, mask, p, norm_pix)
    got = triton_mse(pred_tri, imgs, mask, p, norm_pix)
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.backward()
    got.backward()
    torch.testing.assert_close(pred_tri.grad, pred_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_low_precision_within_twice_torch_error(dtype, norm_pix):
    imgs, p, pred, mask = make_case("video")
    imgs, pred, mask = imgs.to(dtype), pred.to(dtype), mask.float()
    mask[0, 0] = 1

    def run(fn, **kw):
        x = pred.clone().requires_grad_(True)
        loss = fn(x, imgs, mask, p, norm_pix, **kw)
        loss.backward(torch.ones_like(loss))
        return loss.double(), x.grad.double()

    exact = run(ref_mse)                           # fp32 math on the same low-precision inputs
    plain = run(ref_mse, upcast=False)             # plain torch at that precision
    got = run(triton_mse)
    for e, pl, g in zip(exact, plain, got):
        torch_err = (pl - e).abs().max().item()
        assert (g - e).abs().max().item() <= 2 * torch_err + 1e-5


def test_nan_canaries_are_never_read():
    imgs, p, pred, mask = make_case("audio_view")
    mask = mask.float()
    mask[0, 0] = 1
    ibuf = torch.full((3, 2, 40, 70), float("nan"))
    imgs_n = ibuf[:2, :1, :32, :64]
    imgs_n.copy_(imgs)
    pbuf = torch.full((3, 33, 70), float("nan"))
    pred_n = pbuf[:2, :32, :64]
    pred_n.copy_(pred)
    mbuf = torch.full((3, 40), float("nan"))
    mask_n = mbuf[:2, :32]
    mask_n.copy_(mask)
    pred_ref = pred.clone().requires_grad_(True)
    pred_n.requires_grad_(True)
    got = triton_mse(pred_n, imgs_n, mask_n, p, True)
    want = ref_mse(pred_ref, imgs, mask, p, True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got, pred_n)
    want.backward()
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, pred_ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:divide by zero:RuntimeWarning")
def test_no_masked_patch_gives_nan_like_the_reference():
    """0 / 0 stays visible as NaN (no host check in the hot loop), in loss and gradient alike."""
    imgs, p, pred, _ = make_case("video")
    mask = torch.zeros(pred.shape[:2])
    pred.requires_grad_(True)
    got = triton_mse(pred, imgs, mask, p, False)
    assert torch.isnan(got) and torch.isnan(ref_mse(pred, imgs, mask, p, False))
    (g,) = torch.autograd.grad(got, pred)
    assert torch.isnan(g).all()


def test_only_pred_gets_a_gradient():
    imgs, p, pred, mask = make_case("video")
    imgs.requires_grad_(True)
    pred.requires_grad_(True)
    triton_mse(pred, imgs, mask.float(), p, False).backward()
    assert pred.grad is not None and imgs.grad is None


BAD = [
    (lambda pr, im, m: (pr[0], im, m), ValueError, r"pred must be \[B, N, P\], got shape \(6, 48\)"),
    (lambda pr, im, m: (pr, im[0], m), ValueError, r"imgs must be \[B, C, H, W\], got shape \(3, 8, 12\)"),
    (lambda pr, im, m: (pr, im, m[0]), ValueError, r"mask must be \[B, N\], got shape \(6,\)"),
    (lambda pr, im, m: (pr[:, :5], im, m), ValueError,
     r"pred shape \(2, 5, 48\) != \[B, \(H/p\)\(W/p\), p\*p\*C\] = \(2, 6, 48\)"),
    (lambda pr, im, m: (pr, im, m[:, :5]), ValueError, r"mask shape \(2, 5\) != \[B, N\] = \(2, 6\)"),
    (lambda pr, im, m: (pr, im[..., :10], m), ValueError, r"8x10 .* not divisible by patch_size=4"),
    (lambda pr, im, m: (pr.long(), im, m), TypeError, "pred .*torch.int64.* must be floating point"),
    (lambda pr, im, m: (pr, im, m.long()), TypeError, "mask must be float or bool, got torch.int64"),
    (lambda pr, im, m: (pr, im.to("meta"), m), ValueError, "pred on cpu, imgs on meta"),
    (lambda pr, im, m: (pr[:0], im[:0], m[:0]), ValueError, r"empty imgs, shape \(0, 3, 8, 12\)"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
@pytest.mark.parametrize("forced", [False, True])
def test_bad_input_raises_before_compute(make, exc, match, forced):
    args = make(torch.randn(2, 6, 48), torch.randn(2, 3, 8, 12), torch.ones(2, 6))
    with ops.force_triton(forced), pytest.raises(exc, match=match):
        ops.masked_mse(*args, 4)


def test_bad_patch_size_and_norm_pix_on_single_values():
    with pytest.raises(ValueError, match="patch_size=0 must be a positive int"):
        ops.masked_mse(torch.randn(1, 4, 1), torch.randn(1, 1, 2, 2), torch.ones(1, 4), 0)
    with pytest.raises(ValueError, match=r"norm_pix needs >= 2 values per patch.*got p\*p\*C = 1"):
        ops.masked_mse(torch.randn(1, 4, 1), torch.randn(1, 1, 2, 2), torch.ones(1, 4), 1, True)
