"""The GPU hot path, proven on the CPU: no host sync in a training step, no graph break and no
recompilation in the compiled forward, layouts cached on the device (issue 10, guards b, c, d)."""

import pytest
import torch

from _train_helpers import SMALL_DICT
from tgdp.configs import apply_overrides, tiny
from tgdp.model import packing
from tgdp.syncguard import HostSyncGuard
from tgdp.training.distributed import DistInfo, ema_update_
from tgdp.training.loop import build_method, draw_rec_masks, train_step
from tgdp.training.trainer import Trainer
from tgdp.training.sources import RandomSource

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
MODES = {"distinct": {}, "gumbel": {"masking.guide": "gumbel"}, "random": {"masking.guide": "random"},
         "official_compat": {"masking.official_compat": True}}


def _trainer(tmp_path, small=False, **over):
    base = dict(SMALL_DICT) if small else {"data.root": "random", "train.batch_size": 2}
    cfg = apply_overrides(tiny(), {**base, "train.steps": 4, "train.out_dir": str(tmp_path), **over}).validate()
    return Trainer(cfg, CPU, progress=False)


# ----------------------------------------------------------------------------- b: no host sync

@pytest.mark.parametrize("over", [{}, {"train.grad_clip": 1.0, "masking.guide": "gumbel"},
                                  {"data.host_masks": True, "masking.official_compat": True,
                                   "masking.guide": "gumbel"}])
def test_train_step_reads_nothing_on_the_host(tmp_path, over):
    """Every aten op of two tiny() steps (forward, backward, clip, AdamW, EMA) under a dispatch mode
    that refuses .item(), .tolist(), nonzero, equal, bool(tensor), boolean indexing, device copies."""
    tr = _trainer(tmp_path, **over)
    steps = 1 if over else 2    # the first step also builds the layouts; the second runs on the cache
    for step in range(steps):
        batch = tr.source.next()
        with HostSyncGuard():
            train_step(tr.state, batch, step)
    assert tr.state.sums[-2].item() == steps    # every step counted as finite (read outside the guard)


def test_ema_update_has_no_sync_and_is_the_lerp():
    torch.manual_seed(0)
    t = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    s = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    before = [p.detach().clone() for p in t.parameters()]
    want = [p.clone() for p in before]
    torch._foreach_lerp_(want, [p.detach() for p in s.parameters()], 0.25)   # the former update
    with HostSyncGuard():                 # the foreach Scalar overload would read w (aten::item)
        ema_update_(t, s, torch.tensor(0.25))
    for pt, pw in zip(t.parameters(), want):
        assert torch.equal(pt, pw)        # bitwise on the CPU: the demo's numbers do not move
    with HostSyncGuard():
        ema_update_(t, s, torch.tensor(0.0))           # a skipped step leaves the teacher as it is
    assert all(torch.equal(pt, pw) for pt, pw in zip(t.parameters(), want))


def test_ema_multi_tensor_form_used_on_cuda(monkeypatch):
    """The CUDA form (foreach sub/mul/add with a device weight, chunked) is lerp within one rounding."""
    from tgdp.training import distributed
    monkeypatch.setattr(distributed, "_EMA_CHUNK", 50)     # several chunks
    torch.manual_seed(1)
    t = [torch.randn(7, 5), torch.randn(40), torch.randn(3, 30)]
    s = [x + 0.1 * torch.randn_like(x) for x in t]
    want = [torch.lerp(x, y, 0.01) for x, y in zip(t, s)]
    with HostSyncGuard():
        distributed._lerp_multi_tensor_(t, s, torch.tensor(0.01))
    for x, y in zip(t, want):
        torch.testing.assert_close(x, y, rtol=0, atol=4e-7)


def test_ema_chunks_cover_every_parameter_once():
    from tgdp.training.distributed import _chunks
    assert _chunks([3, 3, 3], 6) == [(0, 2), (2, 3)]
    assert _chunks([10, 1, 1], 4) == [(0, 1), (1, 3)]     # a tensor above the limit goes alone
    assert _chunks([], 4) == []


# ----------------------------------------------------------------------------- c: compiled forward

def _forward_inputs(cfg, method, step):
    """What train_step passes to the (compiled) forward at ``step``."""
    src = RandomSource(cfg)
    src.step = step
    b = src.next()
    masks = draw_rec_masks(cfg, step, CPU)
    gen = torch.Generator().manual_seed(step)
    noise = method.draw_noise(b.audio.shape[0], CPU.device, gen, rec=False)
    method.prepare_layouts(b.audio.shape[0], CPU.device)
    return (b.audio, b.frames), dict(masks_rec=masks, noise=noise)


@pytest.mark.parametrize("mode", list(MODES))
def test_training_forward_has_no_graph_break(mode):
    """torch._dynamo.explain of TGDP.forward as train_step calls it: one graph, for every masking
    mode (the random draws are made outside it, MaskNoise)."""
    cfg = apply_overrides(tiny(), {**SMALL_DICT, **MODES[mode]}).validate()
    torch.manual_seed(0)
    method = build_method(cfg, CPU.device)
    args, kwargs = _forward_inputs(cfg, method, 0)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(method)(*args, **kwargs)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [r.reason for r in ex.break_reasons]


def _calls(gm, pred):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and pred(n)]


def _is_device_move(n):
    """A torch.tensor(...) (host data) or a .to / _to_copy that names a device."""
    if n.target is torch.tensor or n.target is torch.as_tensor:
        return True
    if n.target in ("to", "cuda", "cpu") or "to_copy" in str(n.target):
        vals = list(n.args[1:]) + list(n.kwargs.values())
        return n.target != "to" or any(isinstance(v, (torch.device, str)) for v in vals)
    return False


def _compile_steps(tr, steps=3):
    """Run ``steps`` train_steps through torch.compile (a recording backend): graphs traced."""
    graphs = []

    def backend(gm, example_inputs):
        gm.example_inputs = list(example_inputs)    # the real tensors, in placeholder order
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    tr.state.forward = torch.compile(tr.method, backend=backend)
    for step in range(steps):
        train_step(tr.state, tr.source.next(), step)
    return graphs


def test_compiled_steps_do_not_recompile_and_build_nothing_on_the_host(tmp_path):
    """Three train_steps through torch.compile: one compilation (no recompilation), and the traced
    graph holds no torch.tensor, no device .to, no cumsum (guard d: layouts are not rebuilt)."""
    tr = _trainer(tmp_path, small=True, **{"masking.guide": "gumbel", "data.host_masks": True})
    graphs = _compile_steps(tr)
    assert len(graphs) == 1
    gm = graphs[0]
    assert _calls(gm, _is_device_move) == [], [n.format_node() for n in _calls(gm, _is_device_move)]
    assert _calls(gm, lambda n: "cumsum" in str(n.target)) == []
    assert tr.state.sums[-2].item() == 3


# A CPU stand-in for FlashAttention (FA2 >= 2.6 calling convention) registered as a custom op, as
# FA2 >= 2.7 / FA3 are, so the compiled training forward takes the flash path and reads cu_seqlens.
def _varlen_ref(q, k, v, cu, scale):
    """Per-sequence attention: out [total, H, d], lse [H, total] fp32."""
    outs, lses = [], []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        logits = qs @ ks.transpose(1, 2) * scale
        outs.append((logits.softmax(-1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(logits.float(), -1))
    return torch.cat(outs, 0), torch.cat(lses, 1)


@torch.library.custom_op("tgdp_test::varlen_attention", mutates_args=())
def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _varlen_ref(q, k, v, cu, scale)
    return out.contiguous(), lse


@_varlen_op.register_fake
def _(q, k, v, cu, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_bwd(ctx, g_out, g_lse):
    q, k, v, cu = ctx.saved_tensors
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = _varlen_ref(*qkv, cu, ctx.scale)
        return (*torch.autograd.grad(out, qkv, g_out), None, None)


def _varlen_ctx(ctx, inputs, output):
    q, k, v, cu, scale = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.scale = scale


_varlen_op.register_autograd(_varlen_bwd, setup_context=_varlen_ctx)


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    out, lse = _varlen_op(q, k, v, cu_seqlens_q, softmax_scale)
    return (out, lse, None) if return_attn_probs else out


def test_flash_path_compiles_once_and_reads_cached_layouts(tmp_path, monkeypatch):
    """The fast model on its FlashAttention path (a CPU fake with FA2's signature, registered as a
    custom op): three compiled train_steps, one compilation, every cu_seqlens a graph input taken
    from the layout cache, and the same losses as the eager SDPA path."""
    import sys
    import types

    from tgdp.model import attention
    from tgdp.model.fast import FastCAVMAESync
    fa = types.ModuleType("flash_attn")
    fa.flash_attn_varlen_func, fa.__version__ = fake_flash_attn_varlen_func, "2.8.3"
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setattr(attention, "_FLASH", {})
    over = {"masking.guide": "distinct"}
    eager = _trainer(tmp_path / "eager", small=True, **over)
    for step in range(3):
        train_step(eager.state, eager.source.next(), step)
    monkeypatch.setattr(attention, "_flash_runs", lambda q: True)
    monkeypatch.setattr(FastCAVMAESync, "attention_backend", lambda self, device: "flash")
    assert attention.flash_api().module == "flash_attn"   # on CUDA, resolve_backend finds it eagerly
    tr = _trainer(tmp_path / "flash", small=True, **over)
    graphs = _compile_steps(tr)
    assert len(graphs) == 1
    gm = graphs[0]
    assert _calls(gm, lambda n: "tgdp_test.varlen_attention" in str(n.target))   # the flash path ran
    assert _calls(gm, _is_device_move) == []
    cached = {id(m.cu_seqlens) for m in packing._LAYOUTS.values()}
    inputs = dict(zip([n.name for n in gm.graph.nodes if n.op == "placeholder"], gm.example_inputs))
    layout_inputs = [t for name, t in inputs.items() if "cu_seqlens" in name]
    assert len(layout_inputs) >= 4 and all(id(t) in cached for t in layout_inputs), list(inputs)[:8]
    torch.testing.assert_close(tr.state.sums, eager.state.sums, rtol=1e-5, atol=1e-5)


def test_prepared_layouts_are_the_ones_the_forwards_use():
    """prepare_layouts builds exactly what student, teacher and feature forwards look up: running
    them afterwards adds no cache entry (so a compiled forward never builds a layout itself)."""
    cfg = apply_overrides(tiny(), {**SMALL_DICT, "train.batch_size": 3}).validate()
    torch.manual_seed(0)
    method = build_method(cfg, CPU.device)
    packing._LAYOUTS.clear()
    method.prepare_layouts(3, CPU.device)
    before = dict(packing._LAYOUTS)
    args, kwargs = _forward_inputs(cfg, method, 1)
    method(*args, **kwargs).loss.backward()
    method.student.extract_features(*args)
    assert packing._LAYOUTS.keys() == before.keys()
    assert all(packing._LAYOUTS[k] is before[k] for k in before)


def test_layout_is_built_on_the_device_without_host_tensors():
    """cu_seqlens comes from device arange/full (no torch.tensor, no copy) and is cached."""
    packing._LAYOUTS.clear()
    ops = []

    class Log(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))
    with Log():
        meta = packing.view_layout([(2, 5), (3, 2)], "meta")
    assert not any("lift_fresh" in o or "_to_copy" in o or "copy_" in o for o in ops), ops
    assert meta.cu_seqlens.device.type == "meta" and meta.cu_seqlens.dtype == torch.int32
    cpu = packing.view_layout([(2, 5), (3, 2)], "cpu")
    assert cpu.cu_seqlens.tolist() == [0, 5, 10, 12, 14, 16] and cpu.max_seqlen == 5
    assert packing.view_layout([(2, 5), (3, 2)], torch.device("cpu")) is cpu
