"""``python -m tgdp.perf --preset paper``: counted training FLOPs and a *projected* H100 epoch time.

FLOPs are counted, not estimated: one training step (teacher forward, student dual-path forward,
losses, backward) runs under ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no
memory, no compute) and the total is divided by the batch. Only matmul-class ops are counted
(FlopCounterMode's registry: mm/bmm/addmm/SDPA/conv), so elementwise work is left out, as is
usual for MFU. Masks are fixed per mask ratio, so the count does not depend on their values.

The projection assumes a sustained model-FLOP utilisation (MFU, default 40 %) of the dense bf16
peak (H100 SXM: 989 TFLOP/s) and perfect data-parallel scaling; it is an estimate of what the
counted work costs, not a measurement.
"""

from __future__ import annotations

import json
import sys

from tgdp.configs import Config, load

__all__ = ["train_flops_per_sample", "project", "main", "H100_BF16_PEAK", "AS2M_PAIRS"]

H100_BF16_PEAK = 989e12      # dense bf16 FLOP/s, H100 SXM (no sparsity)
AS2M_PAIRS = 1_390_000       # AudioSet-2M training pairs per epoch

def train_flops_per_sample(cfg: Config, device: str = "meta", batch: int | None = None,
                           impl: str | None = None) -> dict:
    """Counted FLOPs per training sample: ``{"total", "teacher", "student_fwd_bwd"}`` (fwd+bwd, teacher
    included). ``device="meta"`` counts without allocating (works for ``paper()`` on a laptop).

    ``impl``: "reference" | "fast" (default: "fast" unless ``train.model_impl`` is "reference" — the
    fast model is what runs on a GPU; both do the same useful work). Counted by ``tgdp.flops``.
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

def project(flops_per_sample: float, pairs: int = AS2M_PAIRS, mfu: float = 0.4,
            peak: float = H100_BF16_PEAK, gpus: int = 1) -> float:
    """Projected seconds per epoch = pairs · FLOPs/sample / (gpus · mfu · peak)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r} must be in (0, 1]")
    if gpus < 1:
        raise ValueError(f"gpus={gpus!r} must be >= 1")
    return pairs * flops_per_sample / (gpus * mfu * peak)

def report(cfg: Config, mfu: float = 0.4, pairs: int = AS2M_PAIRS) -> dict:
    f = train_flops_per_sample(cfg)
    return {"preset": cfg.preset, "counted_on": "reference" if cfg.train.model_impl == "reference" else "fast",
            "flops_per_sample": f, "mfu": mfu,
            "peak_flops": H100_BF16_PEAK, "pairs_per_epoch": pairs,
            "projected_epoch_s": {str(g): project(f["total"], pairs, mfu, H100_BF16_PEAK, g) for g in (1, 8)},
            "kind": "projection (counted FLOPs / (MFU x peak)), not a measurement"}

def _hms(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s"

def _main(argv: list[str]) -> int:
    from tgdp.cli import UserError, parser

    ap = parser("tgdp.perf", __doc__.split("\n\n")[0],
                epilog="Any other --section.field VALUE overrides the config (python -m tgdp.train "
                       "--print-config lists the fields).")
    ap.add_argument("--preset", default="paper", help="config preset: paper | tiny")
    ap.add_argument("--config", default=None, metavar="FILE", help="TOML file applied on top of the preset")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOP utilisation, in (0, 1]")
    ap.add_argument("--pairs", type=int, default=AS2M_PAIRS, help="pairs per epoch (AS-2M: 1.39 M)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args, rest = ap.parse_known_args(argv)
    cfg = load(args.preset, args.config, rest)
    if not 0 < args.mfu <= 1 or args.pairs < 1:
        raise UserError(f"--mfu {args.mfu} must be in (0, 1] and --pairs {args.pairs} >= 1")
    r = report(cfg, args.mfu, args.pairs)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    f = r["flops_per_sample"]
    print(f"Counted FLOPs per training sample ({cfg.preset}, {r['counted_on']} model, FlopCounterMode, "
          f"fwd+bwd, teacher included):")
    print(f"  total            {f['total'] / 1e9:10.1f} GFLOP")
    print(f"  teacher (fwd)    {f['teacher'] / 1e9:10.1f} GFLOP")
    print(f"  student fwd+bwd  {f['student_fwd_bwd'] / 1e9:10.1f} GFLOP")
    print(f"PROJECTION (not a measurement): H100 bf16 dense peak {H100_BF16_PEAK / 1e12:.0f} TFLOP/s at "
          f"{args.mfu:.0%} MFU, {args.pairs:,} pairs per epoch (AS-2M), perfect scaling:")
    for g, s in r["projected_epoch_s"].items():
        print(f"  {g} GPU{'s' if g != '1' else ' '}  {_hms(s)} per epoch ({s:,.0f} s)")
    return 0

def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.perf``: expected errors are one line and exit status 2."""
    from tgdp.cli import run

    return run("tgdp.perf", _main, argv)

if __name__ == "__main__":
    sys.exit(main())
