"""gpucheck step "kernels": the Triton ops against the plain-torch reference at the config's shapes.

On a GPU the ops dispatch to the compiled kernels by themselves (CUDA tensors, triton importable);
the step refuses to run if the interpreter is active. Each op, forward and backward:

- fp32: |triton - reference| <= 1e-5 + 1e-5 |reference| (indices and gathered rows: exactly equal);
- bf16: max |triton - exact| <= 2 x max |plain torch in bf16 - exact| + 1e-5, where exact is the
  computation in fp64 (scores) or fp32 (loss) on the same bf16 inputs.

Shapes (``paper()`` at batch 256): teacher scores on q, k [256, 12, 209 | 197, 64] with and without
the attention's log-sum-exp, both directions; top-k of [256, 208 | 196] scores keeping the
reconstruction and contrastive counts of [.., 768] tokens; the masked MSE on the audio view
[256, 1, 128, 416] (a transposed, non-contiguous view) and the frames [256, 3, 224, 224].
"""

from __future__ import annotations

import time

from tgdp.gpucheck.common import Context, bf16_budget, fp32_close, result

__all__ = ["run"]


def _explicit_scores(q, k, scale, direction, dtype):
    """softmax(scale q k^T) built in full at ``dtype``, the global column (or row), head mean."""
    attn = ((q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale).softmax(dim=-1)
    col = attn[:, :, :, 0] if direction == "patch_to_cls" else attn[:, :, 0, :]
    return col.mean(dim=1)[:, 1:]


def _scores_cases(cfg, b, dev, dtype, gen):
    import torch
    from tgdp import ops
    from tgdp.reference.patch_global_scores import attention_lse, patch_global_scores as ref

    m = cfg.model
    h, d = m.num_heads, m.embed_dim // m.num_heads
    scale = d ** -0.5
    out = []
    for name, n in (("audio", m.num_patches_a), ("video", m.num_patches_v)):
        l = n + 1
        # q, k as the joint layer makes them: strided views of one [B, L, 3, H, d] tensor
        qkv = torch.randn(b, l, 3, h, d, generator=gen, device=dev).to(dtype).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        for direction, with_lse in (("patch_to_cls", True), ("patch_to_cls", False), ("cls_to_patch", False)):
            lse = attention_lse(q, k, scale) if with_lse else None
            got = ops.patch_global_scores(q, k, lse, scale=scale, direction=direction)
            case = {"op": "patch_global_scores", "input": name, "dtype": str(dtype).removeprefix("torch."),
                    "direction": direction, "lse": with_lse, "shape": list(q.shape)}
            if dtype == torch.float32:
                ok, err = fp32_close(got, ref(q, k, lse, scale=scale, direction=direction))
                case.update(ok=ok, err=err)
            else:
                exact = _explicit_scores(q, k, scale, direction, torch.float64)
                plain = _explicit_scores(q, k, scale, direction, dtype)
                ok, err, terr = bf16_budget(got, exact, plain)
                case.update(ok=ok, err=err, torch_err=terr)
            out.append(case)
    return out


def _topk_cases(cfg, b, dev, dtype, gen):
    import torch
    from tgdp import ops
    from tgdp.masking import num_keep
    from tgdp.reference.topk_visible import topk_visible as ref

    m, mc = cfg.model, cfg.masking
    out = []
    for name, n in (("audio", m.num_patches_a), ("video", m.num_patches_v)):
        for ratio in (mc.rec_ratio, mc.con_ratio):
            k = num_keep(n, ratio)
            scores = torch.rand(b, n, generator=gen, device=dev)
            tokens = torch.randn(b, n, m.embed_dim, generator=gen, device=dev).to(dtype)
            grad = torch.randn(b, k, m.embed_dim, generator=gen, device=dev).to(dtype)
            res = []
            for fn in (ops.topk_visible, ref):
                t = tokens.clone().requires_grad_(True)
                ids_keep, ids_restore, mask, vis = fn(scores, k, t)
                vis.backward(grad)
                res.append((ids_keep, ids_restore, mask, vis.detach(), t.grad))
            ok = all(torch.equal(a, r) for a, r in zip(*res))   # selection and gathers are exact
            out.append({"op": "topk_visible", "input": name, "dtype": str(dtype).removeprefix("torch."),
                        "k": k, "shape": list(tokens.shape), "ok": ok, "err": 0.0 if ok else float("nan")})
    return out


def _mse_cases(cfg, b, dev, dtype, gen):
    import torch
    from tgdp import ops
    from tgdp.patching import audio_as_image
    from tgdp.reference.masked_mse import masked_mse as ref

    m, p = cfg.model, cfg.model.patch_size
    audio = torch.randn(b, m.audio_length, m.n_mels, generator=gen, device=dev)
    frames = torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=gen, device=dev)
    out = []
    for name, imgs, n, dim in (("audio", audio_as_image(audio), m.num_patches_a, m.patch_dim_a),
                               ("video", frames, m.num_patches_v, m.patch_dim_v)):
        pred = torch.randn(b, n, dim, generator=gen, device=dev).to(dtype)
        mask = (torch.rand(b, n, generator=gen, device=dev) < cfg.masking.rec_ratio).float()
        imgs = imgs.to(dtype)

        def run(fn, **kw):
            x = pred.clone().requires_grad_(True)
            loss = fn(x, imgs, mask, p, cfg.loss.norm_pix_loss, **kw)
            loss.backward()
            return loss.detach(), x.grad

        got = run(ops.masked_mse)
        case = {"op": "masked_mse", "input": name, "dtype": str(dtype).removeprefix("torch."),
                "shape": list(pred.shape), "norm_pix": cfg.loss.norm_pix_loss}
        if dtype == torch.float32:
            want = run(ref)
            oks, errs = zip(*(fp32_close(g, w) for g, w in zip(got, want)))
            case.update(ok=all(oks), err=max(errs))
        else:
            exact, plain = run(ref), run(ref, upcast=False)
            res = [bf16_budget(g, e, pl) for g, e, pl in zip(got, exact, plain)]
            case.update(ok=all(r[0] for r in res), err=max(r[1] for r in res), torch_err=max(r[2] for r in res))
        out.append(case)
    return out


def run(ctx: Context) -> dict:
    import contextlib

    import torch
    from tgdp import ops
    from tgdp.configs import PRESETS, apply_overrides

    if not ops.triton_available():
        return result(False, "triton is not importable: pip install -e '.[triton]'")
    import tgdp.kernels as kernels

    if kernels.INTERPRET != ctx.smoke:
        return result(False, f"Triton interpreter active={kernels.INTERPRET} in mode {ctx.mode}: "
                             "the compiled kernels are not what runs")
    cfg = apply_overrides(PRESETS[ctx.settings["preset"]](), ctx.settings.get("model_overrides", {}))
    b, dev = ctx.settings["batch"], ctx.device
    if not ctx.smoke:
        probe = torch.zeros(1, device=dev)
        if not ops.use_triton(probe):
            return result(False, "tgdp.ops would not dispatch CUDA tensors to Triton")
    gen = torch.Generator(device=dev).manual_seed(0)
    forced = ops.force_triton() if ctx.smoke else contextlib.nullcontext()
    cases = []
    t0 = time.perf_counter()
    with forced:
        for dtype in (torch.float32, torch.bfloat16):
            for fn in (_scores_cases, _topk_cases, _mse_cases):
                ctx.progress(f"{fn.__name__.strip('_')} {dtype}", cases_done=len(cases))
                cases += fn(cfg, b, dev, dtype, gen)
    if not ctx.smoke:
        torch.cuda.synchronize()
    bad = [c for c in cases if not c["ok"]]
    ratios = [c["err"] / c["torch_err"] for c in cases if c.get("torch_err")]
    worst_fp32 = max((c["err"] for c in cases if c["dtype"] == "float32"), default=0.0)
    summary = (f"{len(cases) - len(bad)}/{len(cases)} cases at batch {b} ({ctx.settings['preset']} shapes); "
               f"fp32 max err {worst_fp32:.1e}; bf16 worst {max(ratios, default=0):.2g}x torch's error")
    if bad:
        summary += "; failing: " + ", ".join(f"{c['op']}/{c['input']}/{c['dtype']}" for c in bad[:4])
    return result(not bad, summary, cases=cases, seconds=round(time.perf_counter() - t0, 2),
                  interpreter=kernels.INTERPRET, device=str(dev))
