"""gpucheck step "model": the fast model in bf16 against the reference model, by the bf16 error budget.

Same weights (a random init with every LayerNorm, bias and token perturbed, so a wrong LayerNorm
mode or a swapped token would show), teacher weights different from the student's, same inputs
and masks. Three training steps (forward + backward, no update):

1. the reference model (explicit attention) in fp32: the truth;
2. the reference model under bf16 autocast: plain torch's bf16 error;
3. the fast model under bf16 autocast (FlashAttention on a GPU, the Triton ops).

For every teacher score and embedding, student prediction and parameter gradient the relative
error ||x - x_fp32|| / ||x_fp32|| of (3) must be <= 2 x that of (2) + 1e-6. The norm-based error is
used (not the max) because a tensor's max error is a noisy statistic of a few elements; the max-abs
errors are in the report too. A loss is one number, so its error is a single random draw (at
batch 2, fast and reference losses with equal embedding errors were seen 1x-4x apart): the rule is
enforced on the tensors every loss is computed from and on every gradient (which carries each
loss's backward), and a loss itself is checked for gross errors only: within 2 x torch's error or
4 bf16 ulps of its value (2^-6 relative), whichever is larger.
"""

from __future__ import annotations

import time

from tgdp.gpucheck.common import BF16_FACTOR, Context, rel_l2, result

__all__ = ["run"]

ATOL = 1e-6
SCALAR_RTOL = 2.0 ** -6      # 4 bf16 ulps, relative (module doc)


def _perturb(module, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1 or "token" in name or "modality" in name:
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.device))


def _step(method, audio, frames, rec, con, amp) -> dict:
    """One forward + backward; every compared tensor, detached, by name."""
    import torch

    seen = {}
    hooked = ((method.teacher.module, "teacher_forward", "teacher"), (method.student, "student_forward", "student"))
    for mod, fn, key in hooked:   # record what the step's own calls return (no extra forwards)
        orig = getattr(mod, fn)
        setattr(mod, fn, lambda *a, _o=orig, _k=key, **kw: seen.setdefault(_k, _o(*a, **kw)))
    try:
        with torch.autocast(audio.device.type, dtype=torch.bfloat16, enabled=amp):
            out = method(audio, frames, masks_rec=rec, masks_con=con)
    finally:
        for mod, fn, _ in hooked:
            delattr(mod, fn)     # back to the class's method
    out.loss.backward()
    vals = {f"loss.{k}": getattr(out, k).detach().float()
            for k in ("loss", "loss_rec_a", "loss_rec_v", "loss_dis", "loss_con")}
    t, s = seen["teacher"], seen["student"]
    vals.update({f"teacher.{k}": getattr(t, k).detach().float() for k in ("scores_a", "scores_v", "cls_a", "cls_v")})
    vals.update({f"student.{k}": getattr(s, k).detach().float() for k in ("pred_a", "pred_v", "cls_a", "cls_v")})
    vals.update({f"grad.{n}": p.grad.detach().float() for n, p in method.student.named_parameters()
                 if p.grad is not None})
    return vals


def run(ctx: Context) -> dict:
    import torch
    from tgdp.configs import PRESETS, apply_overrides
    from tgdp.masking import Masks, random_masks
    from tgdp.method import TGDP
    from tgdp.model import FastCAVMAESync
    from tgdp.reference.model import CAVMAESync

    s = ctx.settings
    cfg = apply_overrides(PRESETS[s["preset"]](), s.get("model_overrides", {}))
    m, b, dev = cfg.model, s["batch"], ctx.device
    torch.manual_seed(0)
    ctx.progress("build models")
    ref = TGDP(cfg, CAVMAESync(m, device=dev), check_finite=False)
    _perturb(ref.student, 1)
    _perturb(ref.teacher.module, 2)
    fast = TGDP(cfg, FastCAVMAESync(m, device=dev), check_finite=False)
    fast.student.load_state_dict(ref.student.state_dict())
    fast.teacher.module.load_state_dict(ref.teacher.module.state_dict())
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(b, m.audio_length, m.n_mels, generator=g).to(dev)
    frames = torch.randn(b, m.in_chans, m.img_size, m.img_size, generator=g).to(dev)

    def masks(n, ratio):
        x = random_masks(b, n, ratio, g)
        return Masks(x.ids_keep.to(dev), x.ids_restore.to(dev), x.mask.to(dev))

    mc = cfg.masking
    rec = (masks(m.num_patches_a, mc.rec_ratio), masks(m.num_patches_v, mc.rec_ratio))
    con = (masks(m.num_patches_a, mc.con_ratio), masks(m.num_patches_v, mc.con_ratio))
    backend = fast.student.attention_backend(audio.device)
    runs = {}
    t0 = time.perf_counter()
    for name, method, amp in (("reference_fp32", ref, False), ("reference_bf16", ref, True), ("fast_bf16", fast, True)):
        ctx.progress(name)
        method.zero_grad(set_to_none=True)
        runs[name] = _step(method, audio, frames, rec, con, amp)
    truth, plain, got = runs["reference_fp32"], runs["reference_bf16"], runs["fast_bf16"]
    if set(truth) != set(got):
        return result(False, f"the fast model's outputs/gradients differ in kind from the reference's: "
                             f"{sorted(set(truth) ^ set(got))[:5]}")
    rows, bad = [], []
    for key in truth:
        e_fast, e_torch = rel_l2(got[key], truth[key]), rel_l2(plain[key], truth[key])
        if got[key].dim() == 0:
            budget = max(BF16_FACTOR * e_torch, SCALAR_RTOL)
        else:
            budget = BF16_FACTOR * e_torch + ATOL
        ok = e_fast <= budget and bool(torch.isfinite(got[key]).all())
        row = {"name": key, "ok": ok, "rel_err": e_fast, "torch_rel_err": e_torch,
               "budget_used": e_fast / budget,
               "max_err": float((got[key].double() - truth[key].double()).abs().max()),
               "torch_max_err": float((plain[key].double() - truth[key].double()).abs().max())}
        rows.append(row)
        if not ok:
            bad.append(row)
    worst = max(rows, key=lambda r: r["budget_used"])
    n_grad = sum(r["name"].startswith("grad.") for r in rows)
    summary = (f"{len(rows) - len(bad)}/{len(rows)} tensors within {BF16_FACTOR:g}x torch's bf16 error "
               f"({n_grad} gradients; {s['preset']} at batch {b}, attention '{backend}'); worst: "
               f"{worst['name']} at {worst['budget_used']:.0%} of its budget")
    problems = [] if ctx.smoke or backend == "flash" else [
        f"attention backend '{backend}': flash-attn is not importable (pip install -e '.[gpu]')"]
    if bad:
        summary += "; over budget: " + ", ".join(r["name"] for r in bad[:4])
    if problems:
        summary = "; ".join(problems) + " | " + summary
    return result(not bad and not problems, summary, attention_backend=backend, batch=b, preset=s["preset"],
                  rows=rows, seconds=round(time.perf_counter() - t0, 2))
