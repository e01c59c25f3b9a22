"""tgdp.ops plumbing: import without triton, the dispatch rule, custom_op registration (opcheck,
torch.compile fullgraph) and the bytes-avoided figures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tgdp import ops

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_reference_path_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None            # any `import triton` now raises ImportError
        import torch
        import tgdp.ops as ops
        assert not ops.triton_available()
        s = torch.randn(2, 10)
        ids_keep, _, mask, _ = ops.topk_visible(s, 3)
        assert torch.equal(ids_keep, torch.sort(s, dim=1, descending=True, stable=True).indices[:, :3])
        q = torch.randn(1, 2, 5, 4)
        assert ops.patch_global_scores(q, q, scale=0.5).shape == (1, 4)
        loss = ops.masked_mse(torch.randn(1, 4, 4), torch.randn(1, 1, 4, 4), torch.ones(1, 4), 2)
        assert loss.shape == ()
        try:
            with ops.force_triton():
                ops.topk_visible(s, 3)
        except RuntimeError as e:
            assert "triton is not importable" in str(e)
        else:
            raise AssertionError("forcing without triton must raise")
        assert "tgdp.kernels" not in sys.modules and "kernels" not in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TGDP_FORCE_TRITON", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_forcing_without_gpu_or_interpreter_says_to_set_triton_interpret():
    """Not Triton's "0 active drivers" from deep inside the first launch: one line, at once."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import os, torch
        import tgdp.ops as ops
        assert not torch.cuda.is_available()
        s = torch.randn(2, 10)
        messages = []
        try:
            with ops.force_triton():
                raise AssertionError("entered")
        except RuntimeError as e:
            messages.append(str(e))
        os.environ["TGDP_FORCE_TRITON"] = "1"
        try:
            ops.topk_visible(s, 3)
        except RuntimeError as e:
            messages.append(str(e))
        print(repr(messages))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("TRITON_INTERPRET", "TGDP_FORCE_TRITON"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    messages = eval(out.stdout)
    assert len(messages) == 2, messages
    for how, msg in zip(("force_triton()", "TGDP_FORCE_TRITON=1"), messages):
        assert "\n" not in msg and "set TRITON_INTERPRET=1" in msg and how in msg, msg
        assert "active drivers" not in msg


def test_dispatch_rule(monkeypatch):
    calls = []

    def fake_topk(scores, k, tokens):
        calls.append("triton")
        return "triton-result"

    spy = type("Kernels", (), {"topk_visible": type("Mod", (), {"topk_visible": staticmethod(fake_topk)})})
    monkeypatch.setattr(ops, "_kernels", lambda: spy)
    monkeypatch.setattr(ops, "_TRITON_FOUND", True)
    monkeypatch.delenv("TGDP_FORCE_TRITON", raising=False)
    scores = torch.randn(2, 6)
    assert ops.topk_visible(scores, 2)[0].shape == (2, 2) and calls == []       # CPU -> reference
    with ops.force_triton():
        assert ops.topk_visible(scores, 2) == "triton-result"
        with ops.force_triton(False):                                           # nesting keeps it forced
            assert ops.topk_visible(scores, 2) == "triton-result"
    assert ops.topk_visible(scores, 2)[0].shape == (2, 2)
    monkeypatch.setenv("TGDP_FORCE_TRITON", "1")
    assert ops.topk_visible(scores, 2) == "triton-result"
    assert calls == ["triton"] * 3
    monkeypatch.delenv("TGDP_FORCE_TRITON")
    # CUDA tensors pick Triton: checked on the rule itself (no GPU here).
    cuda_like = type("T", (), {"is_cuda": True})()
    cpu_like = type("T", (), {"is_cuda": False})()
    assert ops.use_triton(cuda_like, None, cuda_like) and not ops.use_triton(cuda_like, cpu_like)
    monkeypatch.setattr(ops, "_TRITON_FOUND", False)
    assert not ops.use_triton(cuda_like)


# ---- registered ops -------------------------------------------------------------------------

def _opcheck_cases():
    kernels = pytest.importorskip("tgdp.kernels")
    import tgdp.kernels.masked_mse as mse_mod
    import tgdp.kernels.patch_global_scores as pgs_mod
    import tgdp.kernels.topk_visible as topk_mod

    q, k = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1)
    scores = torch.randn(2, 9)
    ids_keep, ids_restore, _ = topk_mod.topk_indices(scores, 4)
    imgs = torch.randn(2, 8, 4).transpose(1, 2).unsqueeze(1)       # audio view, non-contiguous
    mask = (torch.rand(2, 8) < 0.5).float()
    mask[0, 0] = 1
    assert kernels.INTERPRET
    return [
        (pgs_mod._patch_global_scores_op, (q, k, None, 0.3, 0, False, "patch_to_cls")),
        (pgs_mod._patch_global_scores_op, (q, k, lse, 0.3, 2, True, "cls_to_patch")),
        (topk_mod.topk_indices, (scores, 4)),
        (topk_mod.gather_rows, (torch.randn(2, 9, 3, requires_grad=True), ids_keep, ids_restore)),
        (topk_mod.scatter_rows, (torch.randn(2, 4, 3), ids_restore)),
        (mse_mod._masked_mse_op, (torch.randn(2, 8, 4, requires_grad=True), imgs, mask, 2, True)),
        (mse_mod._masked_mse_backward_op, (torch.tensor(1.5), torch.randn(2, 8, 4), imgs, mask, 2, False)),
    ]


def test_opcheck_every_custom_op():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


def _compile_step(backend):
    """Compile a step chaining the three ops on the forced Triton path; compare with eager reference."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def step(q, k, scores, tokens, pred, imgs):
        s = ops.patch_global_scores(q, k, scale=0.25)
        ids_keep, ids_restore, mask, visible = ops.topk_visible(scores + s, 3, tokens)
        return ops.masked_mse(pred, imgs, mask, 2, True) + visible.square().mean()

    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    scores = torch.randn(2, 4)
    imgs = torch.randn(2, 4, 4).transpose(1, 2).unsqueeze(1)       # audio view, non-contiguous
    tokens, pred = torch.randn(2, 4, 6), torch.randn(2, 4, 4)
    eager_args = (q, k, scores, tokens.clone().requires_grad_(), pred.clone().requires_grad_(), imgs)
    compiled_args = (q, k, scores, tokens.clone().requires_grad_(), pred.clone().requires_grad_(), imgs)
    want = step(*eager_args)                                 # eager, reference path
    counter = CompileCounterWithBackend(backend)
    with ops.force_triton():
        got = torch.compile(step, fullgraph=True, backend=counter)(*compiled_args)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    for name in ("tgdp.patch_global_scores", "tgdp.topk_indices", "tgdp.gather_rows", "tgdp.masked_mse"):
        assert name in code
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.backward()
    got.backward()
    for w, g in ((eager_args[3], compiled_args[3]), (eager_args[4], compiled_args[4])):
        torch.testing.assert_close(g.grad, w.grad, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_traces_each_op():
    pytest.importorskip("tgdp.kernels")
    # aot_eager: dynamo + AOTAutograd through the fake impls and register_autograd, no codegen.
    _compile_step("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    pytest.importorskip("tgdp.kernels")
    _compile_step("inductor")


# ---- bytes avoided --------------------------------------------------------------------------

def test_materialised_bytes_counts_new_tensors_not_views():
    x = torch.empty(10, 10, device="meta")
    assert ops.materialised_bytes(lambda: (x + 1) * 2) == 2 * 400
    assert ops.materialised_bytes(lambda: x.t().reshape(100)) == 400     # the reshape of a transpose copies
    assert ops.materialised_bytes(lambda: x.view(100)[:5].unsqueeze(0)) == 0


def test_bytes_avoided_at_paper_shapes():
    b, h, l = 256, 12, 209
    pgs = ops.bytes_avoided("patch_global_scores", batch=b, heads=h, length=l, head_dim=64)
    attn_map = b * h * l * l * 4
    assert pgs["fused"] == b * (l - 1) * 4
    assert 2 * attn_map <= pgs["avoided"] < 2.1 * attn_map     # logits and scaled logits, fp32
    topk = ops.bytes_avoided("topk_visible", batch=b, n=208, k=52, dim=768)
    assert topk["avoided"] >= b * 208 * 768 * 4                 # the backward's zero fill before scatter
    mse = ops.bytes_avoided("masked_mse", batch=b, channels=3, height=224, width=224, patch_size=16, norm_pix=1)
    target = b * 196 * 768 * 4
    assert mse["fused"] == b * 196 * 4 + 12 + target
    assert mse["avoided"] >= 8 * target                         # patchified, normalised, diff, square, 4 in bwd
    with pytest.raises(ValueError, match="op='softmax'"):
        ops.bytes_avoided("softmax", batch=1)
