"""tgdp.model.attention._flash against fake flash-attn modules with the real signatures of every release.

flash-attn cannot be imported without CUDA, so the fakes below copy the *signatures* and return
conventions of the real ``flash_attn_varlen_func`` (read from the flash-attn sdists 2.5.9.post1 and
2.8.3.post2, ``pip download --no-deps flash-attn==...``, and from Dao-AILab/flash-attention's
``hopper/flash_attn_interface.py``) and compute the attention themselves, in float64, so what
``_flash`` passes and how it reads the log-sum-exp is checked against numbers:

- FA2 2.5.x: ``return_attn_probs`` -> ``(out, lse, S_dmask)``, lse *padded* ``[S, H, max_seqlen]``;
- FA2 >= 2.6 (2.8.3.post2): same call, lse ``[H, total]`` (upstream PR #970);
- FA3 2024 betas: no ``return_attn_probs``; always ``(out, lse [H, total])``;
- FA3 2025 before upstream commit 203b9b3d (2025-08-29; the 2.8.3.post2 sdist's hopper/): no
  ``return_attn_probs`` (a TypeError if passed), returns ``out`` only;
- FA3 from 203b9b3d: ``return_attn_probs=False`` last; ``out`` or ``(out, lse [H, total])``.
"""

import math
import sys
import types

import pytest
import torch

from tgdp.model import attention
from tgdp.model.attention import _flash, flash_api, resolve_backend
from tgdp.model.packing import view_layout

VIEWS = [(2, 5), (1, 1), (3, 7)]
H, D = 3, 8
SCALE = D ** -0.5


def _reference(q, k, v, cu, scale):
    """Per-sequence float64 attention: out [total, H, d], lse [H, total]."""
    outs, lses = [], []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].double().transpose(0, 1) for t in (q, k, v))
        logits = qs @ ks.transpose(1, 2) * scale
        outs.append((logits.softmax(-1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(logits, -1))
    return torch.cat(outs, 0).to(q.dtype), torch.cat(lses, 1).float()


def _padded(lse, cu, max_seqlen):
    """FA2 2.5.x layout [S, H, max_seqlen]; the rows past a sequence's end hold garbage (NaN here)."""
    bounds = cu.tolist()
    out = torch.full((len(bounds) - 1, lse.shape[0], max_seqlen), float("nan"))
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[i, :, : e - s] = lse[:, s:e]
    return out


CALLS: list[dict] = []


def _record(kind, **kw):
    CALLS.append(dict(kind=kind, **kw))


# --- FA2 2.5.9.post1: flash_attn/flash_attn_interface.py
def fa2_v25(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
            causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
            block_table=None):
    _record("fa2_v25", softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_attn_probs,
            cu=(cu_seqlens_q, cu_seqlens_k), max=(max_seqlen_q, max_seqlen_k), dropout_p=dropout_p)
    out, lse = _reference(q, k, v, cu_seqlens_q, softmax_scale)
    return out if not return_attn_probs else (out, _padded(lse, cu_seqlens_q, max_seqlen_q), None)


# --- FA2 2.8.3.post2: flash_attn/flash_attn_interface.py
def fa2_v28(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
            causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
            return_attn_probs=False, block_table=None):
    _record("fa2_v28", softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_attn_probs,
            cu=(cu_seqlens_q, cu_seqlens_k), max=(max_seqlen_q, max_seqlen_k), dropout_p=dropout_p)
    out, lse = _reference(q, k, v, cu_seqlens_q, softmax_scale)
    return out if not return_attn_probs else (out, lse, None)


# --- FA3 2024 beta: hopper/flash_attn_interface.py (FlashAttnVarlenFunc returns out, softmax_lse)
def fa3_2024(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
             q_descale=None, k_descale=None, v_descale=None, window_size=(-1, -1), softcap=0.0, num_splits=1,
             pack_gqa=None, deterministic=False):
    _record("fa3_2024", softmax_scale=softmax_scale, causal=causal, cu=(cu_seqlens_q, cu_seqlens_k),
            max=(max_seqlen_q, max_seqlen_k))
    return _reference(q, k, v, cu_seqlens_q, softmax_scale)


# --- FA3 before 203b9b3d: the hopper/ folder of the 2.8.3.post2 sdist (returns out only)
def fa3_pre(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
            softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
            window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
            sm_margin=0):
    _record("fa3_pre", softmax_scale=softmax_scale, causal=causal, cu=(cu_seqlens_q, cu_seqlens_k),
            max=(max_seqlen_q, max_seqlen_k))
    return _reference(q, k, v, cu_seqlens_q, softmax_scale)[0]


# --- FA3 from 203b9b3d (2025-08-29): return_attn_probs as the last parameter
def fa3_post(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
             softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
             window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
             deterministic=False, sm_margin=0, return_attn_probs=False):
    _record("fa3_post", softmax_scale=softmax_scale, causal=causal, return_attn_probs=return_attn_probs,
            cu=(cu_seqlens_q, cu_seqlens_k), max=(max_seqlen_q, max_seqlen_k))
    out, lse = _reference(q, k, v, cu_seqlens_q, softmax_scale)
    return (out, lse) if return_attn_probs else out


FAKES = {  # name -> (module name, function, version, gives lse, takes return_attn_probs)
    "fa2_v25": ("flash_attn", fa2_v25, "2.5.9.post1", True, True),
    "fa2_v28": ("flash_attn", fa2_v28, "2.8.3.post2", True, True),
    "fa3_2024": ("flash_attn_interface", fa3_2024, "", True, False),
    "fa3_pre": ("flash_attn_interface", fa3_pre, "", False, False),
    "fa3_post": ("flash_attn_interface", fa3_post, "", True, True),
}


@pytest.fixture
def install(monkeypatch):
    """Put fake flash-attn modules in sys.modules (both names hidden otherwise); reset the lookup."""
    monkeypatch.setattr(attention, "_FLASH", {})
    for name in ("flash_attn", "flash_attn_interface"):
        monkeypatch.setitem(sys.modules, name, None)   # None = "import fails"
    CALLS.clear()

    def put(*names):
        for n in names:
            module, fn, version, _, _ = FAKES[n]
            mod = types.ModuleType(module)
            mod.flash_attn_varlen_func = fn
            if version:
                mod.__version__ = version
            monkeypatch.setitem(sys.modules, module, mod)
        attention._FLASH.clear()
    return put


def _qkv(dtype=torch.float32):
    lengths = [n for c, n in VIEWS for _ in range(c)]
    g = torch.Generator().manual_seed(3)
    return [torch.randn(sum(lengths), H, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("name", list(FAKES))
@pytest.mark.parametrize("return_lse", [True, False])
def test_flash_calls_each_release_right_and_reads_its_lse(install, name, return_lse):
    install(name)
    module, _, version, gives_lse, takes = FAKES[name]
    api = flash_api()
    assert (api.module, api.version, api.takes_return_attn_probs) == (module, version, takes)
    q, k, v = _qkv()
    meta = view_layout(VIEWS, "cpu")
    out, lse = _flash(q, k, v, meta, SCALE, return_lse)
    ref_out, ref_lse = _reference(q, k, v, meta.cu_seqlens, SCALE)
    torch.testing.assert_close(out, ref_out)
    if return_lse and gives_lse:
        assert lse is not None and lse.dtype == torch.float32 and lse.shape == (H, meta.total)
        torch.testing.assert_close(lse, ref_lse)    # the padded FA2 2.5 layout is unpadded right
    else:
        assert lse is None      # FA3 before 203b9b3d has none: the caller recomputes it
    (call,) = CALLS
    assert call["kind"] == name and call["softmax_scale"] == SCALE and call["causal"] is False
    assert call["cu"][0] is meta.cu_seqlens and call["cu"][1] is meta.cu_seqlens
    assert call["max"] == (meta.max_seqlen, meta.max_seqlen) == (7, 7)
    assert call.get("dropout_p", 0.0) == 0.0
    if takes:
        assert call["return_attn_probs"] is return_lse
    else:
        assert "return_attn_probs" not in call


def test_fa3_is_preferred_over_fa2(install):
    install("fa2_v28", "fa3_post")
    assert flash_api().module == "flash_attn_interface"
    q, k, v = _qkv()
    _flash(q, k, v, view_layout(VIEWS, "cpu"), SCALE, True)
    assert [c["kind"] for c in CALLS] == ["fa3_post"]


def test_unexpected_lse_layout_raises(install, monkeypatch):
    install("fa2_v28")

    def bad(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
            causal=False, return_attn_probs=False):
        out, _, _ = fa2_v28(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale=softmax_scale, return_attn_probs=True)
        return out, torch.zeros(5), None
    monkeypatch.setattr(sys.modules["flash_attn"], "flash_attn_varlen_func", bad)
    attention._FLASH.clear()
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"lse of shape \(5,\)"):
        _flash(q, k, v, view_layout(VIEWS, "cpu"), SCALE, True)


def test_resolve_backend_sees_the_fake_but_needs_cuda(install):
    install("fa3_post")
    assert resolve_backend("auto", "cpu") == "sdpa"     # flash is CUDA-only
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("flash", "cpu")


# A flash build that torch.compile can trace (FA2 >= 2.7 and FA3 register custom ops): _flash's own
# Python (the convention switch, the lse unpadding) must add no graph break around it.
@torch.library.custom_op("tgdp_test::fake_flash_varlen", mutates_args=())
def _fake_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _reference(q, k, v, cu, scale)
    return out, _padded(lse, cu, max_seqlen)


@_fake_op.register_fake
def _(q, k, v, cu, max_seqlen, scale):
    return torch.empty_like(q), q.new_empty((cu.shape[0] - 1, q.shape[1], max_seqlen), dtype=torch.float32)


def fa2_v25_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
               causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
               block_table=None):
    out, lse = _fake_op(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale)
    return (out, lse, None) if return_attn_probs else out


def test_flash_path_traces_without_graph_breaks(install, monkeypatch):
    install("fa2_v25")
    monkeypatch.setattr(sys.modules["flash_attn"], "flash_attn_varlen_func", fa2_v25_op)
    attention._FLASH.clear()
    meta = view_layout(VIEWS, "cpu")
    flash_api()                                   # found eagerly, as prepare_layouts does
    q, k, v = _qkv()
    explain = torch._dynamo.explain(lambda q, k, v: _flash(q, k, v, meta, SCALE, True))(q, k, v)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    out, lse = torch.compile(lambda q, k, v: _flash(q, k, v, meta, SCALE, True), backend="eager",
                             fullgraph=True)(q, k, v)
    ref_out, ref_lse = _reference(q, k, v, meta.cu_seqlens, SCALE)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert math.isfinite(float(lse.sum()))
