"""``python -m tgdp.train`` / ``torchrun --nproc_per_node=N -m tgdp.train``: TG-DP pretraining.

    python -m tgdp.train                                   # the main job: demo set -> tiny() -> retrieval report
    python -m tgdp.train --demo --train.steps 50           # the main job with overrides
    torchrun --standalone --nproc_per_node=2 -m tgdp.train --preset tiny --train.steps 20
    python -m tgdp.train --config run.toml --train.dist fsdp2 --train.resume true

Everything after the known flags is a dotted config override (``--model.depth 2``). The config is
built and validated — unknown keys, out-of-range values, a global batch not divisible by the
world size — before any data is read or any process group is created.
"""

from __future__ import annotations

import argparse
import json
import sys

from tgdp.configs import Config, ConfigError, load

__all__ = ["main", "parse_args", "resolve_data_root"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    ap = argparse.ArgumentParser(prog="python -m tgdp.train", allow_abbrev=False,
                                 description=__doc__.split("\n\n")[0],
                                 epilog="Any other --section.field VALUE overrides the config.")
    ap.add_argument("--config", default=None, help="TOML file applied on top of the preset")
    ap.add_argument("--preset", default=None, help="paper | tiny (default: paper, tiny with --demo)")
    ap.add_argument("--demo", action="store_true",
                    help="the main job: generate the demo set, train, evaluate retrieval, write a report")
    args, rest = ap.parse_known_args(argv)
    demo = args.demo or not argv
    preset = args.preset or ("tiny" if demo else "paper")
    cfg = load(preset, args.config, rest)
    args.demo = demo
    return args, cfg


def check_before_data(cfg: Config) -> None:
    """Checks that need more than one config section; run before any data is read."""
    from tgdp.training.distributed import check_world

    check_world(cfg)
    from tgdp.training.loop import fast_unsupported

    why = fast_unsupported(cfg)
    if cfg.train.model_impl == "fast" and why:
        raise ConfigError(f"train.model_impl='fast' is not supported with {why}; use 'reference' or 'auto'")
    if cfg.data.root == "random" and cfg.train.steps <= 0:
        raise ConfigError("train.steps=0 with data.root='random': the noise source has no epochs; "
                          "set train.steps")


def resolve_data_root(cfg: Config, is_main: bool) -> str | None:
    """Training shard folder: ``data.root``; the demo set's ``train`` split (generated once, cached, by
    rank 0 while the others wait) for ``data.root = ""``; None for the noise source."""
    if cfg.data.root == "random":
        return None
    if cfg.data.root:
        return cfg.data.root
    from pathlib import Path

    from tgdp.training.distributed import barrier

    if is_main:
        from tgdp.data.synthetic import ensure_demo
        ensure_demo(cfg.data.demo_dir)
    barrier()
    return str(Path(cfg.data.demo_dir).expanduser() / "train")


def train(cfg: Config, progress: bool = True) -> dict:
    """Train with an already validated config in this process (joins the torchrun group if any)."""
    from tgdp.training.distributed import init_distributed, shutdown
    from tgdp.training.loop import Trainer

    check_before_data(cfg)
    info = init_distributed(cfg)
    try:
        root = resolve_data_root(cfg, info.is_main)
        summary = Trainer(cfg, info, root, progress=progress).run()
        if info.is_main:
            from tgdp.training.demo import write_loss_plot
            summary["loss_plot"] = write_loss_plot(cfg.train.out_dir)
        return summary
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, cfg = parse_args(argv)
        check_before_data(cfg)
    except ConfigError as exc:
        print(f"tgdp.train: config error: {exc}", file=sys.stderr)
        return 2
    if args.demo:
        from tgdp.training.demo import run_demo
        report = run_demo(cfg)
        print(json.dumps({k: report[k] for k in ("report_md", "report_json", "plots")}, indent=2))
        return 0
    summary = train(cfg)
    if summary.get("checkpoint"):
        print(f"[tgdp.train] done: {summary['steps']} steps, summary {cfg.train.out_dir}/summary.json, "
              f"checkpoint {summary['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
