"""``python -m tgdp.ablate``: train every variant × seed, evaluate on a held-out split, compare.

    python -m tgdp.ablate --demo --seeds 3 --steps 600              # the demo corpus, all six variants
    python -m tgdp.ablate --data DIR --val-data DIR --preset paper --variants baseline,tgdp --seeds 3 --steps 20000
    python -m tgdp.ablate ... --variants-file mine.toml --variants baseline,tgdp,my_variant
    python -m tgdp.ablate --list [--variants-file mine.toml]       # the variants and their overrides

Every run uses the same steps, batch, data and evaluation; seed s gives every variant the same
initial weights, data order and reconstruction masks, so variants are compared pairwise per seed.
Writes ``OUT/ablation.{md,json,png}`` (rewritten after every finished run) and one folder per run
under ``OUT/runs/``. Rerunning the same command skips finished runs and resumes a killed one from
its checkpoint. Any other ``--section.field VALUE`` overrides the config of every run.
"""

from __future__ import annotations

import difflib
import re
import shlex
import sys
import time
from pathlib import Path

from tgdp.cli import UserError, parser, run, writing_to

PROG = "tgdp.ablate"
DEFAULT_VARIANTS = ("baseline", "dual_random", "tgdp", "tgdp_gumbel", "tgdp_no_distill", "official_compat")
DEMO_VAL = 1000


def parse_args(argv: list[str]):
    doc = __doc__.split("\n\n")
    ap = parser(PROG, "\n\n".join(doc[:2]), epilog="\n\n".join(doc[2:]))
    ap.add_argument("--data", default=None, help="training shard folder")
    ap.add_argument("--val-data", default=None, help="held-out shard folder (retrieval, probe)")
    ap.add_argument("--demo", action="store_true",
                    help=f"use the demo corpus: its 400 training clips + {DEMO_VAL} held-out clips, generated "
                         "once next to data.demo_dir (implies --preset tiny)")
    ap.add_argument("--demo-seed", type=int, default=0, help="seed of the demo corpus (tgdp.data.synthetic)")
    ap.add_argument("--demo-classes", type=int, default=None, help="class count of the demo corpus (default 10)")
    ap.add_argument("--preset", default=None, help="paper | tgdp | tiny (default: paper, tiny with --demo)")
    ap.add_argument("--config", default=None, help="TOML config file applied on top of the preset")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated variant names")
    ap.add_argument("--variants-file", default=None, help="TOML file with more [variants.<name>] tables")
    ap.add_argument("--baseline", default="baseline", help="the variant the others are compared with")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per variant (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of every run (default: train.steps)")
    ap.add_argument("--out", default="runs/ablation", help="study folder (default runs/ablation)")
    ap.add_argument("--torchrun", type=int, default=1, metavar="N", help="processes per run (torchrun; default 1)")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="runs at once, each a child process with OMP_NUM_THREADS = cores / N (default 1: in this "
                         "process)")
    ap.add_argument("--no-probe", action="store_true", help="skip the probe even when the data has labels")
    ap.add_argument("--device", default="auto", help="evaluation device: auto | cpu | cuda")
    ap.add_argument("--list", action="store_true", help="print the variants, their overrides and FLOPs, then exit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    return ap.parse_known_args(argv)


def _select(names: str, known: dict) -> list:
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"unknown variant {name!r} in --variants; {hint}known: {', '.join(known)} "
                            "(add your own with --variants-file)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserError(f"variant name {name!r} may use only letters, digits, '_', '-', '.'; rename it")
        if name not in [v.name for v in out]:
            out.append(known[name])
    if not out:
        raise UserError("--variants is empty; name at least two variants, e.g. --variants baseline,tgdp")
    return out


def _demo_corpus(cfg, seed: int, classes: int | None) -> tuple[str, str]:
    from tgdp.data.synthetic import CLASSES, ensure_demo

    n_classes = len(CLASSES) if classes is None else classes
    base = Path(cfg.data.demo_dir).expanduser()
    name = "ablation" + ("" if (seed, n_classes) == (0, len(CLASSES)) else f"-seed{seed}-classes{n_classes}")
    folder = base.parent / name
    print(f"[{PROG}] demo corpus: {folder} (seed {seed}, {n_classes} classes, 400 training + {DEMO_VAL} held-out "
          "clips; generated once)", flush=True)
    try:
        ensure_demo(folder, n_train=400, n_val=DEMO_VAL, seed=seed, n_classes=n_classes)
    except ValueError as exc:
        raise UserError(f"demo corpus {folder}: {exc}") from None
    return str(folder / "train"), str(folder / "val")


def _check_split(flag: str, root: str | None) -> int:
    from tgdp.data.shards import read_manifest

    if not root:
        raise UserError(f"{flag} is missing: give a shard folder (python -m tgdp.prepare makes one), or use --demo")
    try:
        return int(read_manifest(root)["num_samples"])
    except ValueError as exc:
        raise UserError(f"{flag} {root}: {exc}") from None


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def _main(argv: list[str]) -> int:
    from tgdp.ablate.report import summarize, write_outputs
    from tgdp.ablate.pool import run_all
    from tgdp.ablate.runner import RunSpec, Study, flops_per_step, run_config, run_dir
    from tgdp.ablate.variants import format_overrides, load_variants, resolve
    from tgdp.configs import load

    args, rest = parse_args(argv)
    preset = args.preset or ("tiny" if args.demo else "paper")
    base = load(preset, args.config, rest)
    known = load_variants(args.variants_file)
    if args.list:
        print(f"variant            GFLOP/step ({preset}, batch {base.train.batch_size}; tgdp.flops)  overrides")
        for v in known.values():
            gf = flops_per_step(resolve(base, v))["per_step"] / 1e9
            print(f"{v.name:18s} {gf:10.1f}  {format_overrides(v.overrides)}\n{'':18s} {v.description} [{v.source}]")
        return 0
    variants = _select(args.variants, known)
    names = [v.name for v in variants]
    if args.baseline not in names:
        raise UserError(f"--baseline {args.baseline!r} is not among --variants {','.join(names)}; add it or "
                        "choose another baseline")
    variants.sort(key=lambda v: v.name != args.baseline)          # baseline first
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: need at least 1 (2 for a confidence interval, 3+ recommended)")
    if args.torchrun < 1 or args.jobs < 1:
        raise UserError(f"--torchrun {args.torchrun} --jobs {args.jobs}: each needs at least 1")
    steps = args.steps if args.steps is not None else base.train.steps
    if steps < 1:
        raise UserError(f"--steps {steps}: give the number of training steps of every run (>= 1)")

    if args.demo:
        if args.data or args.val_data:
            raise UserError("--demo uses its own corpus; drop --data/--val-data, or drop --demo")
        args.data, args.val_data = _demo_corpus(base, args.demo_seed, args.demo_classes)
    n_train = _check_split("--data", args.data)
    n_val = _check_split("--val-data", args.val_data)
    if n_val == 0:
        raise UserError(f"--val-data {args.val_data} holds no clips; give a held-out shard folder with clips")
    study = Study(out=Path(args.out).expanduser().resolve(), data=str(Path(args.data).expanduser().resolve()),
                  val_data=str(Path(args.val_data).expanduser().resolve()), base=base, steps=steps,
                  seeds=tuple(range(args.seeds)), torchrun=args.torchrun, probe=not args.no_probe)

    # Every run's config is built and checked before any training starts.
    from tgdp.training.launch import check_before_data
    from tgdp.training.distributed import check_world

    specs = [RunSpec(v, s) for s in study.seeds for v in variants]
    for spec in specs:       # the training split's clips and batch size are checked here too
        cfg = run_config(study, spec)
        check_before_data(cfg)
        check_world(cfg, study.torchrun)
    flops = {v.name: flops_per_step(run_config(study, RunSpec(v, study.seeds[0]))) for v in variants}

    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[{PROG}] {len(variants)} variants x {len(study.seeds)} seeds = {len(specs)} runs of {steps} steps "
          f"(batch {base.train.batch_size}, preset {preset}) -> {study.out}", flush=True)
    for v in variants:
        print(f"[{PROG}]   {v.name:18s} {flops[v.name]['per_step'] / 1e9:9.1f} GFLOP/step  "
              f"{format_overrides(v.overrides)}", flush=True)

    settings = {"command": "python -m tgdp.ablate " + shlex.join(argv), "preset": preset, "steps": steps,
                "batch": base.train.batch_size, "seeds": list(study.seeds), "data": study.data,
                "val_data": study.val_data, "num_train": n_train, "num_val_manifest": n_val, "device": device,
                "torchrun": study.torchrun, "jobs": args.jobs}
    results: dict[str, dict[int, dict]] = {v.name: {} for v in variants}
    folders = {v.name: {s: run_dir(study, RunSpec(v, s)) for s in study.seeds} for v in variants}
    t_start, ran_times, outputs = time.perf_counter(), [], {}
    index = {(spec.variant.name, spec.seed): i for i, spec in enumerate(specs, 1)}

    def tag(spec) -> str:
        return f"[{PROG}] run {index[(spec.variant.name, spec.seed)]}/{len(specs)} {spec.variant.name} seed {spec.seed}"

    def on_start(spec, log: str) -> None:
        if args.jobs > 1:
            print(f"{tag(spec)}: started (log {log})", flush=True)

    def on_done(spec, result: dict, ran: bool, t0: float) -> None:
        nonlocal outputs
        if ran:
            ran_times.append(time.perf_counter() - t0)
        results[spec.variant.name][spec.seed] = result
        r, probe = result["retrieval"], result.get("probe")
        left = len(specs) - sum(len(x) for x in results.values())
        eta = (f"; about {_fmt_s(left * sum(ran_times) / len(ran_times) / args.jobs)} left"
               if ran_times and left else "")
        what = (f"done in {_fmt_s(result['train_s'] + result['eval_s'])} (train {result['train_s']:.0f} s, "
                f"eval {result['eval_s']:.0f} s)" if ran else "finished earlier, skipped")
        print(f"{tag(spec)}: {what} - R@1 V→A {r['v2a']['R@1']:.2f} A→V {r['a2v']['R@1']:.2f}"
              + (f", probe {probe['metric']} {probe['value']:.1f}" if probe else "") + eta, flush=True)
        done = [x for per in results.values() for x in per.values()]
        settings["wall_s"] = sum(x["train_s"] + x["eval_s"] for x in done)      # summed over runs
        settings["invocation_wall_s"] = time.perf_counter() - t_start
        settings["num_val"], settings["num_frames"] = result.get("num_val"), result.get("num_frames")
        summary = summarize({v.name: {"description": v.description, "overrides": v.overrides,
                                      "flops": flops[v.name], "results": results[v.name]} for v in variants},
                            args.baseline, settings)
        outputs = write_outputs(study.out, summary, folders)

    with writing_to(study.out):
        run_all(study, specs, on_done, jobs=args.jobs, device=device, on_start=on_start)
    print(f"[{PROG}] wrote {outputs['md']}, {outputs['json']}, {outputs['plot']} "
          f"(this invocation {_fmt_s(time.perf_counter() - t_start)})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: expected errors are one line on stderr and exit status 2 (``tgdp.cli.run``)."""
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
