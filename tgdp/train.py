"""python -m tgdp.train / torchrun --nproc_per_node=N -m tgdp.train: TG-DP pretraining.

    python -m tgdp.train                                  # the main job: demo set -> tiny() -> retrieval report
    python -m tgdp.train --demo --train.steps 50          # the main job with overrides
    python -m tgdp.train --preset paper --data.root DIR   # pretraining on shards from python -m tgdp.prepare
    torchrun --standalone --nproc_per_node=2 -m tgdp.train --demo --train.steps 20
    python -m tgdp.train --config run.toml --train.dist fsdp2 --train.resume true
    python -m tgdp.train --print-config --preset tiny > run.toml   # every field, commented

Everything after the known flags is a dotted config override (--model.depth 2, --train.lr=1e-4);
python -m tgdp.train --print-config lists every field with its type, default and meaning. A run
needs --data.root DIR (or --demo). The config is built and validated -- unknown keys, out-of-range
values, a missing data folder, a global batch not divisible by the world size or larger than the
data -- before any data is read or any process group is created.
"""

from __future__ import annotations

import json
import sys

from tgdp.cli import parser, run, writing_to

__all__ = ["main", "parse_args", "train"]

PROG = "tgdp.train"


def _parser():
    doc = __doc__.split("\n\n")
    ap = parser(PROG, "\n\n".join(doc[:2]), epilog=doc[2])
    ap.add_argument("--config", default=None, metavar="FILE", help="TOML file applied on top of the preset")
    ap.add_argument("--preset", default=None, help="paper | tgdp | tiny (default: paper, tiny with --demo)")
    ap.add_argument("--demo", action="store_true",
                    help="the main job: use (and first generate) the embedded demo set, train, evaluate "
                         "retrieval on its held-out split, write a report")
    ap.add_argument("--print-config", action="store_true",
                    help="print the full config (preset + file + overrides) as TOML, one comment per field "
                         "(type, default, meaning), and exit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    return ap


def parse_args(argv: list[str]):
    """(args, validated config). With no arguments at all, ``--demo`` is implied."""
    from tgdp.configs import load

    args, rest = _parser().parse_known_args(argv)
    args.demo = args.demo or not argv
    args.overrides = list(rest)
    args.preset = args.preset or ("tiny" if args.demo else "paper")
    return args, load(args.preset, args.config, rest)


def train(cfg, progress: bool = True, **kw) -> dict:
    """Train with an already validated config in this process (see :func:`tgdp.training.launch.train`)."""
    from tgdp.training.launch import train as _train

    return _train(cfg, progress, **kw)


def _chose_out_dir(args) -> bool:
    """Did the user name ``train.out_dir`` (an override or the TOML file)?"""
    if any(a == "--train.out_dir" or a.startswith("--train.out_dir=") for a in args.overrides):
        return True
    if args.config:
        import tomllib

        with open(args.config, "rb") as fh:   # already parsed once by load(): known to be valid
            return "out_dir" in tomllib.load(fh).get("train", {})
    return False


def _demo_folder(args, cfg):
    """The main job never refuses to start because an earlier main job used its default folder: with
    the preset's own ``train.out_dir`` (and neither resume nor overwrite asked for) it moves on to the
    first free ``<out_dir>-N``. An ``out_dir`` the user chose is claimed as usual (refused if taken)."""
    import dataclasses
    import os
    from pathlib import Path

    from tgdp.configs import PRESETS
    from tgdp.training.rundir import free_folder

    t = cfg.train
    if t.resume or t.overwrite or t.out_dir != PRESETS[args.preset]().train.out_dir or _chose_out_dir(args):
        return cfg
    free = free_folder(Path(t.out_dir))
    if str(free) == t.out_dir:
        return cfg
    if os.environ.get("RANK", "0") == "0":
        print(f"[tgdp.train] {t.out_dir} holds an earlier run; this run writes to {free} "
              f"(--train.resume true continues the earlier one)", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, out_dir=str(free)))


def _main(argv: list[str]) -> int:
    args, cfg = parse_args(argv)
    if args.print_config:
        from tgdp.config_docs import DOCS, SECTIONS
        from tgdp.config_io import to_toml

        print(to_toml(cfg, {**SECTIONS, **DOCS}), end="")
        return 0
    from tgdp.training.header import Origin
    from tgdp.training.launch import check_before_data

    check_before_data(cfg, demo=args.demo)
    origin = Origin(args.preset, args.config, tuple(args.overrides))
    if args.demo:
        from tgdp.training.demo import run_demo

        cfg = _demo_folder(args, cfg)

        with writing_to(cfg.train.out_dir):
            report = run_demo(cfg, origin=origin)
        if report is not None:  # rank 0
            print(json.dumps({k: report[k] for k in ("report_md", "report_json", "plots")}, indent=2))
        return 0
    with writing_to(cfg.train.out_dir):
        summary = train(cfg, origin=origin)
    if summary.get("checkpoint"):
        print(f"[tgdp.train] done: {summary['steps']} steps, summary {cfg.train.out_dir}/summary.json, "
              f"checkpoint {summary['checkpoint']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point (also the ``tgdp-train`` script): expected errors are one line and exit status 2."""
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
