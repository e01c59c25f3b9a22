"""``python -m tgdp.flops --preset paper``: counted FLOPs of one training step, reference vs fast model.

Everything is counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul-class ops: mm, bmm,
addmm, conv, SDPA; elementwise work is not counted), by default on the meta device (no memory, no
compute: ``paper()`` counts in seconds). A training step per sample is

- the teacher forward (no grad; it runs once per step when distillation or guided masking is on),
- the student forward on both views + losses + backward (one view with ``masking.dual_path false``,
  the CAV-MAE Sync single pass).

Three rows: the reference model with the official schedule (its wasted work: the teacher's unused
unified joint pass and the discarded a/v joint passes of the reconstruction view), the reference
with our schedule, and the fast model (same useful work as the second row, packed). FlopCounterMode
has no formula for the CPU flash SDPA kernels, so one is added here (the same count as the CUDA
SDPA kernels) and the count is the same on CPU and on the meta device.
"""

from __future__ import annotations

import sys

from tgdp.configs import Config

__all__ = ["count_step_flops", "compare", "main"]

# torch is imported inside the functions, so ``python -m tgdp.flops --help`` answers at once.


def _cpu_sdpa_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _counter():
    """A ``FlopCounterMode`` that also counts the CPU flash SDPA kernels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_bwd})


def _masks(batch: int, n: int, ratio: float, device: str):
    import torch

    from tgdp.masking import Masks, random_masks

    m = random_masks(batch, n, ratio, torch.Generator().manual_seed(0))  # drawn on CPU, values irrelevant
    return Masks(m.ids_keep.to(device), m.ids_restore.to(device), m.mask.to(device))


def count_step_flops(cfg: Config, impl: str = "fast", schedule: str = "fast", batch: int = 2,
                     device: str = "meta") -> dict[str, float]:
    """Counted FLOPs per training sample of ``impl`` ("reference" | "fast") under ``schedule``.

    Returns ``{"teacher": fwd, "student": fwd+bwd incl. losses, "total"}`` per sample. Masks are
    fixed per ratio (the count does not depend on which patches are kept).
    """
    import torch

    from tgdp.method import TGDP
    from tgdp.model.fast import FastCAVMAESync
    from tgdp.reference.model import CAVMAESync

    if impl not in ("reference", "fast"):
        raise ValueError(f"impl={impl!r} must be 'reference' or 'fast'")
    if batch < 1:
        raise ValueError(f"batch={batch!r} must be >= 1")
    m = cfg.model
    model = (FastCAVMAESync if impl == "fast" else CAVMAESync)(m, device=device)
    method = TGDP(cfg, model, check_finite=False)
    audio = torch.zeros(batch, m.audio_length, m.n_mels, device=device)
    frames = torch.zeros(batch, m.in_chans, m.img_size, m.img_size, device=device)
    mc = cfg.masking
    rec = (_masks(batch, m.num_patches_a, mc.rec_ratio, device), _masks(batch, m.num_patches_v, mc.rec_ratio, device))
    con = (_masks(batch, m.num_patches_a, mc.con_ratio, device), _masks(batch, m.num_patches_v, mc.con_ratio, device))
    con = con if mc.dual_path else None   # the single pass (CAV-MAE Sync) has no contrastive view

    with _counter() as fc, torch.no_grad():
        method.teacher.module.teacher_forward(audio, frames, direction=mc.score_direction,
                                              renormalize=mc.renormalize_scores, schedule=schedule)
    teacher = fc.get_total_flops()
    # With given masks TGDP runs the teacher only for distillation; subtract it to get the student.
    teacher_in_step = cfg.loss.w_dis > 0
    with _counter() as fc:
        out = method(audio, frames, masks_rec=rec, masks_con=con, schedule=schedule)
        out.loss.backward()
    student = fc.get_total_flops() - (teacher if teacher_in_step else 0)
    teacher = teacher if method.runs_teacher else 0
    return {"teacher": teacher / batch, "student": student / batch, "total": (teacher + student) / batch}


def compare(cfg: Config, batch: int = 2, device: str = "meta") -> dict[str, dict[str, float]]:
    """The three rows of the table: reference (official schedule), reference (fast schedule), fast."""
    return {
        "reference, official schedule": count_step_flops(cfg, "reference", "official", batch, device),
        "reference, tgdp schedule": count_step_flops(cfg, "reference", "fast", batch, device),
        "fast model (packed)": count_step_flops(cfg, "fast", "fast", batch, device),
    }


def format_table(rows: dict[str, dict[str, float]]) -> str:
    base = rows["reference, official schedule"]["total"]
    lines = [f"{'model':32s} {'teacher fwd':>12s} {'student f+b':>12s} {'total':>12s} {'vs official':>12s}",
             f"{'':32s} {'GFLOP':>12s} {'GFLOP':>12s} {'GFLOP':>12s} {'':>12s}"]
    for name, r in rows.items():
        lines.append(f"{name:32s} {r['teacher'] / 1e9:12.2f} {r['student'] / 1e9:12.2f} "
                     f"{r['total'] / 1e9:12.2f} {r['total'] / base:11.3f}x")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    from tgdp.cli import UserError, parser
    from tgdp.configs import load

    ap = parser("tgdp.flops", __doc__.split("\n\n")[0],
                epilog="Any other --section.field VALUE overrides the config (python -m tgdp.train "
                       "--print-config lists the fields).")
    ap.add_argument("--preset", default="paper", help="config preset: paper | tgdp | tiny")
    ap.add_argument("--config", default=None, metavar="FILE", help="TOML file applied on top of the preset")
    ap.add_argument("--batch", type=int, default=2, help="batch counted (results are per sample)")
    ap.add_argument("--device", default="meta", choices=("meta", "cpu"),
                    help="meta: no memory, no compute; cpu: real tensors")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args, rest = ap.parse_known_args(argv)
    cfg = load(args.preset, args.config, rest)
    if args.batch < 1:
        raise UserError(f"--batch {args.batch} must be >= 1")
    rows = compare(cfg, args.batch, args.device)
    print(f"Counted FLOPs per training sample ({cfg.preset}; FlopCounterMode; teacher fwd + student "
          f"fwd+bwd; rec ratio {cfg.masking.rec_ratio}, con ratio {cfg.masking.con_ratio}):")
    print(format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.flops``: expected errors are one line and exit status 2."""
    from tgdp.cli import run

    return run("tgdp.flops", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
