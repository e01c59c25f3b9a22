"""``python -m tgdp.perf --preset paper``: a per-op roofline projection of the H100 training time.

One training step of the fast model (teacher forward, student forward on both views, losses,
backward, fused Adam(W), EMA lerp) is counted op by op on the meta device by
:func:`tgdp.roofline.count_train_step` (FLOPs and HBM bytes per op, bf16 autocast emulated,
FlashAttention and the Triton ops counted as their fused kernels). Each op then takes

    t_op = max(executed FLOPs / (peak x e_compute[class]), bytes / (HBM bandwidth x e_memory[class]), floor)

and the step is the sum over its ops (one GPU runs them one after another). Two figures bound the
step: **eager** (every aten op a kernel with its own HBM traffic) and **fused** (the memory-bound ops
perfectly fused, as ``torch.compile`` at best achieves; see :mod:`tgdp.roofline`). A data-parallel
step adds the part of the gradient all-reduce that the backward cannot hide.

Assumed efficiencies (fractions of the H100 SXM's 989 TFLOP/s dense bf16 and 3.35 TB/s HBM3) —
assumptions, not measurements; ``--eff CLASS=COMPUTE,MEMORY`` changes them, and the first GPU run
(``python -m tgdp.gpucheck``) measures what they stand for:

- matmul 0.70 / 0.80: the GEMMs are large and well shaped (M = 10k-28k packed tokens per GPU at
  batch 64, N and K 512-3072), the regime where cuBLAS runs closest to its plateau; the plateau sits
  well under the datasheet peak (boost clocks are not sustained under full tensor-core load).
- attention 0.35 / 0.80: FlashAttention on short sequences (58-404 tokens) at head dim 64, the size
  where it is least efficient; its backward also recomputes the scores (counted as executed FLOPs).
- fused 0.60 (memory): the Triton ops are memory-bound gathers with index math, not tuned per GPU.
- memory 0.80: streaming elementwise / norm / copy kernels reach 80-90 % of HBM bandwidth.
- optimizer 0.80 (memory): fused Adam(W) and the foreach EMA lerp are multi-tensor streaming kernels.
- floor 2 us per kernel: launch, ramp-up and tail of a small kernel, even under CUDA graphs.
- all-reduce: 360 GB/s NCCL bus bandwidth over NVLink 4 (450 GB/s per direction per GPU), fp32
  gradients, DDP buckets overlapped with the backward.
"""

from __future__ import annotations

import argparse
import json
import sys

from tgdp.configs import Config, load

__all__ = ["train_flops_per_sample", "roofline", "epoch_seconds", "report", "main", "H100_BF16_PEAK",
           "H100_HBM_BW", "ALLREDUCE_BUSBW", "EFFICIENCY", "KERNEL_FLOOR_S", "AS2M_PAIRS", "PAPER_EPOCH_S"]

H100_BF16_PEAK = 989e12        # dense bf16 FLOP/s, H100 SXM (no sparsity)
H100_HBM_BW = 3.35e12          # HBM3 bytes/s, H100 SXM
ALLREDUCE_BUSBW = 360e9        # assumed NCCL all-reduce bus bandwidth, 8 x H100 SXM (NVLink 4)
KERNEL_FLOOR_S = 2e-6          # assumed shortest kernel
# class -> (compute efficiency, memory efficiency); None = the class has no counted FLOPs
EFFICIENCY = {"matmul": (0.70, 0.80), "attention": (0.35, 0.80), "fused": (None, 0.60),
              "memory": (None, 0.80), "optimizer": (None, 0.80)}
AS2M_PAIRS = 1_390_395         # paper §4.1: valid AudioSet-2M pairs used for pretraining
PAPER_EPOCH_S = 1045           # paper Table 4 / supplement Table 2: s per epoch on 8 x H100
TARGET_EPOCH_S = 120           # design target on 8 x H100


def train_flops_per_sample(cfg: Config, device: str = "meta", batch: int | None = None,
                           impl: str | None = None) -> dict:
    """Counted FLOPs per training sample: ``{"total", "teacher", "student_fwd_bwd"}`` (fwd+bwd, teacher
    included), by :func:`tgdp.flops.count_step_flops` (FlopCounterMode, matmul-class ops).

    ``impl``: "reference" | "fast" (default: "fast" unless ``train.model_impl`` is "reference").
    ``batch`` defaults to the global ``train.batch_size``: the contrastive logits (B x B_global x D)
    are the one term that grows with the batch (< 0.01 % of the total at ``paper()``)."""
    batch = cfg.train.batch_size if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch={batch!r} must be >= 1")
    impl = impl or ("reference" if cfg.train.model_impl == "reference" else "fast")
    if impl not in ("reference", "fast"):
        raise ValueError(f"impl={impl!r} must be 'reference' or 'fast'")
    from tgdp.flops import count_step_flops

    r = count_step_flops(cfg, impl, "fast", batch, device)
    return {"total": r["total"], "teacher": r["teacher"], "student_fwd_bwd": r["student"]}


def _check_eff(eff: dict) -> None:
    for cls, (ec, em) in eff.items():
        for name, e in (("compute", ec), ("memory", em)):
            if e is not None and not 0 < e <= 1:
                raise ValueError(f"efficiency {cls} {name}={e!r} must be in (0, 1]")


def roofline(calls, fused_memory_bytes: int, fused_memory_kernels: int, *, peak: float = H100_BF16_PEAK,
             bandwidth: float = H100_HBM_BW, eff: dict | None = None, floor_s: float = KERNEL_FLOOR_S) -> dict:
    """Per-class time of one step from its kernels.

    calls: ``(phase, class, model FLOPs, executed FLOPs, bytes)`` per kernel (``count_train_step``).
    Returns ``{"classes": {cls: {"kernels", "flops", "bytes", "eager_s", "fused_bytes", "fused_s",
    "bound"}}, "eager_s", "fused_s", "flops", "backward_s"}``; "fused" differs from "eager" only in the
    memory class (perfect fusion bound). ``bound``: "compute" or "memory", whichever dominates its time.
    """
    eff = {**EFFICIENCY, **(eff or {})}
    _check_eff(eff)
    classes = {c: {"kernels": 0, "flops": 0, "bytes": 0, "eager_s": 0.0, "compute_s": 0.0, "memory_s": 0.0}
               for c in EFFICIENCY}
    backward_s = 0.0
    for phase, cls, flops, exec_flops, nbytes in calls:
        ec, em = eff[cls]
        tc = exec_flops / (peak * ec) if ec else 0.0
        tm = nbytes / (bandwidth * em)
        t = max(tc, tm, floor_s)
        row = classes[cls]
        row["kernels"] += 1
        row["flops"] += flops
        row["bytes"] += nbytes
        row["eager_s"] += t
        row["compute_s"] += tc
        row["memory_s"] += tm
        if phase == "backward":
            backward_s += t
    for cls, row in classes.items():
        row["fused_bytes"], row["fused_s"] = row["bytes"], row["eager_s"]
        row["bound"] = "compute" if row["compute_s"] >= row["memory_s"] else "memory"
        del row["compute_s"], row["memory_s"]
    mem = classes["memory"]
    mem["fused_bytes"] = fused_memory_bytes
    mem["fused_s"] = max(fused_memory_bytes / (bandwidth * eff["memory"][1]), fused_memory_kernels * floor_s)
    return {"classes": classes, "eager_s": sum(r["eager_s"] for r in classes.values()),
            "fused_s": sum(r["fused_s"] for r in classes.values()),
            "flops": sum(r["flops"] for r in classes.values()), "backward_s": backward_s}


def allreduce_seconds(grad_bytes: int, gpus: int, busbw: float = ALLREDUCE_BUSBW) -> float:
    """NCCL all-reduce time: size x 2(n-1)/n / bus bandwidth (0 on one GPU)."""
    return 0.0 if gpus < 2 else grad_bytes * 2 * (gpus - 1) / gpus / busbw


def epoch_seconds(step_s: float, batch_per_gpu: int, gpus: int, pairs: int = AS2M_PAIRS,
                  exposed_comm_s: float = 0.0) -> float:
    """Epoch = (pairs // global batch) steps (drop-last) x (step + exposed communication)."""
    if batch_per_gpu < 1 or gpus < 1:
        raise ValueError(f"batch_per_gpu={batch_per_gpu!r} and gpus={gpus!r} must be >= 1")
    return pairs // (batch_per_gpu * gpus) * (step_s + exposed_comm_s)


def report(cfg: Config, batches=(64, 256), gpus=(1, 8), pairs: int = AS2M_PAIRS, eff: dict | None = None,
           floor_s: float = KERNEL_FLOOR_S) -> dict:
    """The projection for each per-GPU batch (dict, JSON-ready)."""
    from tgdp.roofline import count_train_step

    _check_eff({**EFFICIENCY, **(eff or {})})      # before the (slower) count
    out = {"preset": cfg.preset, "kind": "projection from counted FLOPs and bytes, not a measurement",
           "hardware": {"name": "H100 SXM", "peak_bf16_flops": H100_BF16_PEAK, "hbm_bytes_per_s": H100_HBM_BW,
                        "allreduce_busbw": ALLREDUCE_BUSBW},
           "efficiency": {k: list(v) for k, v in {**EFFICIENCY, **(eff or {})}.items()},
           "kernel_floor_s": floor_s, "pairs_per_epoch": pairs, "target_epoch_s_8gpu": TARGET_EPOCH_S,
           "batches": {}}
    for b in batches:
        count, info = count_train_step(cfg, b)
        r = roofline(info["calls"], count.fused_memory_bytes, count.fused_memory_kernels, eff=eff, floor_s=floor_s)
        ar = {g: allreduce_seconds(info["grad_bytes"], g) for g in gpus}
        exposed = {g: max(0.0, ar[g] - r["backward_s"]) for g in gpus}
        top = sorted(count.by_op.items(), key=lambda kv: -kv[1][2])[:8]
        row = {"flops_per_sample": r["flops"] / b, "grad_bytes": info["grad_bytes"],
               "top_ops": [{"op": k, "calls": v[0], "flops": v[1], "bytes": v[2]} for k, v in top],
               "classes": r["classes"], "step_s": {"eager": r["eager_s"], "fused": r["fused_s"]},
               "mfu": {k: r["flops"] / (r[f"{k}_s"] * H100_BF16_PEAK) for k in ("eager", "fused")},
               "allreduce_s": {str(g): ar[g] for g in gpus}, "allreduce_exposed_s": {str(g): exposed[g] for g in gpus},
               "epoch_s": {k: {str(g): epoch_seconds(r[f"{k}_s"], b, g, pairs, exposed[g]) for g in gpus}
                           for k in ("eager", "fused")}}
        out["batches"][str(b)] = row
    return out


def paper_mfu(cfg: Config, pairs: int = AS2M_PAIRS) -> float:
    """MFU implied by the paper's 1,045 s per epoch on 8 x H100 for the official schedule's FLOPs."""
    from tgdp.flops import count_step_flops

    f = count_step_flops(cfg, "reference", "official", 2, "meta")["total"]
    return f * pairs / (PAPER_EPOCH_S * 8 * H100_BF16_PEAK)


def _hms(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def format_report(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"PROJECTION (not a measurement): {r['preset']} preset, fast model, one training step per GPU "
             f"(teacher fwd + student fwd/bwd + Adam(W) + EMA), counted per op on the meta device;",
             f"{hw['name']}: {hw['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 dense, "
             f"{hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM; t_op = max(FLOPs / (peak x e_c), bytes / (BW x e_m), "
             f"{r['kernel_floor_s'] * 1e6:.0f} us).",
             "eager = every aten op its own kernel; fused = memory-bound ops perfectly fused "
             "(torch.compile's best case)."]
    for b, row in r["batches"].items():
        lines.append("")
        lines.append(f"batch {b} per GPU: {row['flops_per_sample'] / 1e9:.2f} GFLOP per sample")
        lines.append(f"  {'class':10s} {'kernels':>7s} {'GFLOP':>9s} {'GB':>8s} {'e_c':>5s} {'e_m':>5s} {'bound':>8s} "
                     f"{'eager ms':>9s} {'fused GB':>9s} {'fused ms':>9s}")
        for cls, c in row["classes"].items():
            ec, em = r["efficiency"][cls]
            lines.append(f"  {cls:10s} {c['kernels']:7d} {c['flops'] / 1e9:9.1f} {c['bytes'] / 1e9:8.2f} "
                         f"{'-' if ec is None else f'{ec:.2f}':>5s} {em:5.2f} {c['bound']:>8s} "
                         f"{c['eager_s'] * 1e3:9.2f} {c['fused_bytes'] / 1e9:9.2f} {c['fused_s'] * 1e3:9.2f}")
        tot = {k: sum(c[k] for c in row["classes"].values()) for k in ("kernels", "flops", "bytes", "fused_bytes")}
        lines.append(f"  {'total':10s} {tot['kernels']:7d} {tot['flops'] / 1e9:9.1f} {tot['bytes'] / 1e9:8.2f} "
                     f"{'':5s} {'':5s} {'':8s} {row['step_s']['eager'] * 1e3:9.2f} {tot['fused_bytes'] / 1e9:9.2f} "
                     f"{row['step_s']['fused'] * 1e3:9.2f}")
        lines.append("  most bytes (eager): " + ", ".join(
            f"{t['op'].split(':')[1]} {t['bytes'] / 1e9:.1f} GB ({t['calls']}x)" for t in row["top_ops"][:6]))
        lines.append(f"  step {row['step_s']['eager'] * 1e3:.1f} ms eager / {row['step_s']['fused'] * 1e3:.1f} ms "
                     f"fused -> MFU {row['mfu']['eager']:.1%} / {row['mfu']['fused']:.1%}")
        for g, s in row["allreduce_s"].items():
            if float(s) > 0:
                lines.append(f"  {g} GPUs: gradient all-reduce {float(s) * 1e3:.1f} ms per step, "
                             f"{row['allreduce_exposed_s'][g] * 1e3:.1f} ms not hidden by the backward")
        for g in row["epoch_s"]["eager"]:
            e, f = row["epoch_s"]["eager"][g], row["epoch_s"]["fused"][g]
            lines.append(f"  AS-2M epoch ({r['pairs_per_epoch']:,} pairs) on {g} GPU{'s' if g != '1' else ''}: "
                         f"{_hms(f)} fused ... {_hms(e)} eager ({f:,.0f}-{e:,.0f} s)")
    lines.append("")
    lines.append(verdict(r))
    return "\n".join(lines)


def verdict(r: dict) -> str:
    """Does the projection meet the 8-GPU design target, and what dominates the step."""
    parts = []
    for b, row in r["batches"].items():
        f, e = row["epoch_s"]["fused"].get("8"), row["epoch_s"]["eager"].get("8")
        if f is None:
            continue
        top = max(row["classes"].items(), key=lambda kv: kv[1]["fused_s"])
        share = top[1]["fused_s"] / row["step_s"]["fused"]
        state = "meets" if e <= TARGET_EPOCH_S else ("meets only if compiled" if f <= TARGET_EPOCH_S else "misses")
        parts.append(f"batch {b}/GPU {state} it ({f:.0f}-{e:.0f} s; {top[0]} is {share:.0%} of the fused step)")
    return f"Design target {TARGET_EPOCH_S} s per epoch on 8 x H100: " + "; ".join(parts) + "."


def _parse_eff(items: list[str]) -> dict:
    from tgdp.cli import UserError

    out = {}
    for item in items:
        cls, _, vals = item.partition("=")
        if cls not in EFFICIENCY or not vals:
            raise UserError(f"--eff {item!r}: expected CLASS=COMPUTE,MEMORY with CLASS one of {list(EFFICIENCY)}; "
                            f"e.g. --eff matmul=0.6,0.8")
        try:
            ec, em = (None if v in ("", "-") else float(v) for v in vals.split(","))
        except ValueError:
            raise UserError(f"--eff {item!r}: COMPUTE,MEMORY must be two numbers (compute '-' for none)") from None
        if em is None:
            raise UserError(f"--eff {item!r}: the memory efficiency is needed (every class moves bytes)")
        out[cls] = (ec, em)
    try:
        _check_eff(out)
    except ValueError as exc:
        raise UserError(f"--eff: {exc}") from None
    return out


def _main(argv: list[str]) -> int:
    from tgdp.cli import UserError, parser

    ap = parser("tgdp.perf", __doc__.split("\n\n")[0],
                epilog="Any other --section.field VALUE overrides the config (python -m tgdp.train "
                       "--print-config lists the fields). The efficiencies and what they assume: tgdp/perf.py.")
    ap.add_argument("--preset", default="paper", help="config preset: paper | tgdp | tiny")
    ap.add_argument("--config", default=None, metavar="FILE", help="TOML file applied on top of the preset")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="samples per GPU, one table each")
    ap.add_argument("--pairs", type=int, default=AS2M_PAIRS, help="pairs per epoch (AS-2M as the paper used it)")
    ap.add_argument("--eff", action="append", default=None, metavar="CLASS=COMPUTE,MEMORY",
                    help="override an assumed efficiency, e.g. matmul=0.6,0.8 (compute '-' for none)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args, rest = ap.parse_known_args(argv)
    if any(b < 1 for b in args.batch) or args.pairs < 1:
        raise UserError(f"--batch {args.batch} and --pairs {args.pairs} must be >= 1")
    eff = _parse_eff(args.eff or [])
    cfg = load(args.preset, args.config, rest)
    r = report(cfg, tuple(args.batch), pairs=args.pairs, eff=eff)
    r["paper_epoch_mfu"] = paper_mfu(cfg, args.pairs) if cfg.preset == "paper" else None
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(format_report(r))
    if r["paper_epoch_mfu"] is not None:
        print(f"For scale: the paper's {PAPER_EPOCH_S:,} s per epoch on 8 x H100 is {r['paper_epoch_mfu']:.1%} MFU "
              f"on the official schedule's counted FLOPs.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.perf``: expected errors are one line and exit status 2."""
    from tgdp.cli import run

    return run("tgdp.perf", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
