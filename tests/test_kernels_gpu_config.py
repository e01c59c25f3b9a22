"""The Triton kernels under the interpreter at the block sizes and warps their launchers pick on a GPU
(``tgdp.kernels.gpu_launch_config``): multi-block online softmax, multi-tile rank loops, several
row and column tiles, partial last tiles — parity with the reference, forward and backward.

The other op tests run at the interpreter's own settings (one large program per row), which never
take those paths. Shapes are just large enough to give every loop and grid axis several blocks.
"""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.masked_mse import masked_mse as ref_mse
from tgdp.reference.patch_global_scores import attention_lse
from tgdp.reference.patch_global_scores import patch_global_scores as ref_scores
from tgdp.reference.topk_visible import topk_visible as ref_topk

pytest.importorskip("triton")
K = pytest.importorskip("tgdp.kernels")


def run_gpu_config(fn, *args, **kwargs):
    """fn under the forced Triton path at the GPU launch configuration -> (result, launches)."""
    with ops.force_triton(), K.gpu_launch_config(), K.record_launches() as launches:
        out = fn(*args, **kwargs)
    return out, launches


def only(launches, kernel):
    (launch,) = [x for x in launches if x.kernel == kernel]
    return launch


def test_gpu_config_differs_from_the_interpreter_config():
    scores = torch.randn(2, 150)
    with ops.force_triton(), K.record_launches() as interp:
        ops.topk_visible(scores, 40)
    _, gpu = run_gpu_config(ops.topk_visible, scores, 40)
    assert only(interp, "_rank_kernel").grid == (1, 2)            # one program per row
    assert only(gpu, "_rank_kernel").grid == (3, 2)               # 64-wide tiles, as on a GPU
    assert K.INTERPRET and K.interpreter_blocks()                 # the switch is scoped to the block


def qk(b, h, l, d, dtype=torch.float32):
    qkv = torch.randn(b, l, 3, h, d).to(dtype).permute(2, 0, 3, 1, 4)   # non-contiguous, as the model
    return qkv[0], qkv[1]


@pytest.mark.parametrize("direction", ["patch_to_cls", "cls_to_patch"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_patch_global_scores_fp32(direction, with_lse):
    b, h, l, d = 2, 2, 150, 64                                  # d = 64: paper's head dim
    q, k = qk(b, h, l, d)
    q, k = q * 2, k * 2                                          # peaked rows: the running max moves
    lse = attention_lse(q, k, d ** -0.5) if with_lse else None
    want = ref_scores(q, k, lse, scale=d ** -0.5, global_index=3, direction=direction)
    got, launches = run_gpu_config(ops.patch_global_scores, q, k, lse, scale=d ** -0.5, global_index=3,
                                   direction=direction)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if direction == "patch_to_cls":
        launch = only(launches, "_patch_to_cls_kernel")
        meta = launch.meta
        assert launch.grid == (-(-l // meta["BLOCK_M"]), b) and launch.grid[0] >= 3
        if not with_lse:                                         # the fp32 streaming configuration
            assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"]) == (32, 32, 8)
            assert l > 4 * meta["BLOCK_N"]                       # 5 key blocks, the last one partial
    else:
        launch = only(launches, "_cls_to_patch_kernel")
        assert launch.meta["BLOCK_N"] == 64 and launch.grid == (3, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patch_global_scores_low_precision_within_twice_torch_error(dtype):
    b, h, l, d = 2, 2, 150, 64
    q, k = qk(b, h, l, d, dtype)
    scale = d ** -0.5

    def explicit(dt):
        attn = ((q.to(dt) @ k.to(dt).transpose(-2, -1)) * scale).softmax(-1)
        return attn[:, :, 1:, 0].mean(1).double()

    exact, plain = explicit(torch.float64), explicit(dtype)
    got, launches = run_gpu_config(ops.patch_global_scores, q, k, scale=scale)
    meta = only(launches, "_patch_to_cls_kernel").meta
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"]) == (64, 64, 4)
    assert (got.double() - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-5


def test_topk_visible_multi_tile_forward_and_backward():
    b, n, k, d = 2, 150, 40, 300
    scores = (torch.randn(b, n) * 3).round() / 3                 # ties across tiles
    scores[1, 70] = float("nan")
    tokens = torch.randn(b, d, n).transpose(1, 2).requires_grad_(True)
    want = ref_topk(scores, k, tokens)
    got, launches = run_gpu_config(ops.topk_visible, scores, k, tokens)
    for w, g in zip(want, got):
        assert torch.equal(g, w)
    grad = torch.randn(b, k, d)
    (g_want,) = torch.autograd.grad(want[3], tokens, grad)
    with K.gpu_launch_config(), K.record_launches() as bwd:
        (g_got,) = torch.autograd.grad(got[3], tokens, grad)
    assert torch.equal(g_got, g_want)
    assert only(launches, "_rank_kernel").grid == (3, b)                    # 3 x 3 tiles of 64
    assert only(launches, "_gather_rows_kernel").grid == (3, b, 2)          # rows of 16, columns of 256
    assert only(bwd, "_scatter_rows_kernel").grid == (10, b, 2)


@pytest.mark.parametrize("kind", ["audio", "video"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_multi_tile_forward_and_backward(kind, norm_pix):
    if kind == "audio":                                          # fbank view, P = 256: tiles of 16 patches
        imgs, n_tiles = torch.randn(2, 160, 32).transpose(1, 2).unsqueeze(1), 2
    else:                                                        # P = 768: tiles of 4 patches
        imgs, n_tiles = torch.randn(2, 3, 32, 48), 2
    b, c, hh, ww = imgs.shape
    n, p_dim = (hh // 16) * (ww // 16), 256 * c
    pred = torch.randn(b, n, p_dim)
    mask = (torch.rand(b, n) < 0.6).float()
    mask[:, 0] = 1
    pred_ref, pred_tri = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    want = ref_mse(pred_ref, imgs, mask, 16, norm_pix)
    got, launches = run_gpu_config(ops.masked_mse, pred_tri, imgs, mask, 16, norm_pix)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.backward()
    with K.gpu_launch_config(), K.record_launches() as bwd:
        got.backward()
    torch.testing.assert_close(pred_tri.grad, pred_ref.grad, atol=1e-5, rtol=1e-5)
    for launch in (only(launches, "_masked_mse_fwd_kernel"), only(bwd, "_masked_mse_bwd_kernel")):
        assert launch.grid == (n_tiles, b)
        assert launch.meta["BLOCK_NP"] * launch.meta["BLOCK_P"] == 4096         # the GPU tile budget
        assert n % launch.meta["BLOCK_NP"] != 0                                 # a partial last tile


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_mse_low_precision_within_twice_torch_error(dtype):
    imgs = torch.randn(2, 3, 32, 48).to(dtype)
    pred = torch.randn(2, 6, 768).to(dtype)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]])

    def run(fn, **kw):
        x = pred.clone().requires_grad_(True)
        loss = fn(x, imgs, mask, 16, True, **kw)
        (g,) = torch.autograd.grad(loss, x)
        return loss.double(), g.double()

    exact = run(ref_mse)
    plain = run(ref_mse, upcast=False)
    with K.gpu_launch_config():
        got = run(lambda *a: run_gpu_config(ops.masked_mse, *a)[0])
    for e, pl, g in zip(exact, plain, got):
        assert (g - e).abs().max() <= 2 * (pl - e).abs().max() + 1e-5
