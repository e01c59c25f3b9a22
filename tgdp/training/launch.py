"""Train with a validated config in this process: the checks before data, the data root, the
start-up header, the :class:`~tgdp.training.trainer.Trainer`, the loss plot.

Shared by ``python -m tgdp.train`` (:mod:`tgdp.train`, the command line) and the demo job
(:mod:`tgdp.training.demo`); both import this module and neither imports the other.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tgdp.cli import UserError
from tgdp.configs import Config, ConfigError
from tgdp.training.header import DataSummary, Origin

__all__ = ["check_before_data", "check_data", "resolve_data_root", "write_loss_plot", "train", "say"]

PREFIX = "[tgdp.train]"


def say(*lines: str) -> None:
    """Rank-0 progress text: one ``[tgdp.train]`` line per argument, flushed."""
    for line in lines:
        print(f"{PREFIX} {line}", flush=True)


def check_before_data(cfg: Config, demo: bool = False) -> None:
    """Checks that need more than one config section, and the data folder's manifest; run before any
    data is read or a process group is created."""
    from tgdp.training.distributed import check_world

    check_world(cfg)
    if cfg.data.root == "random" and cfg.train.steps <= 0:
        raise ConfigError("train.steps=0 with data.root='random': the noise source has no epochs; "
                          "set train.steps")
    if not cfg.data.root and not demo:
        raise ConfigError("data.root is not set: pass --data.root DIR (a shard folder made by python -m "
                          "tgdp.prepare; 'random' = a noise source) or --demo (the embedded demo set)")
    if cfg.train.init and not Path(cfg.train.init).expanduser().is_file():
        raise ConfigError(f"train.init={cfg.train.init!r}: no such checkpoint file; give an official or tgdp "
                          "checkpoint (python -m tgdp.convert import makes one)")
    if cfg.data.root and cfg.data.root != "random":
        check_data(cfg, cfg.data.root)


def check_data(cfg: Config, root: str) -> DataSummary:
    """The training split's manifest: it exists, holds clips, and at least one full global batch."""
    from tgdp.data.shards import read_manifest

    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"data.root={root}: no such folder; pass --data.root with a shard folder made by "
                        "python -m tgdp.prepare, or use --demo")
    try:
        manifest = read_manifest(path)
    except ValueError as exc:  # no manifest, bad JSON, wrong version (the message names the file)
        raise UserError(f"data.root={root}: {exc}") from None
    n, b = int(manifest["num_samples"]), cfg.train.batch_size
    skipped = len(manifest.get("skipped", []))
    if n == 0:
        raise UserError(f"data.root={root} holds no clips ({skipped} inputs were skipped by prepare, see "
                        f"{path / 'skipped.json'}); prepare a split with usable videos")
    if n < b:
        raise UserError(f"train.batch_size={b} is larger than the {n} clips of {root}, so no full batch "
                        f"exists; lower --train.batch_size to at most {n}")
    return DataSummary(str(path), n, len(manifest["shards"]), skipped)


def resolve_data_root(cfg: Config, is_main: bool, demo: bool = False) -> str | None:
    """Training shard folder: ``data.root``; with ``demo`` and no ``data.root`` the demo set's
    ``train`` split (generated once by rank 0 while the others wait, announced); None for noise."""
    if cfg.data.root == "random":
        return None
    if cfg.data.root:
        return cfg.data.root
    if not demo:
        raise ConfigError("data.root is not set: pass --data.root DIR or --demo")
    from tgdp.training.distributed import barrier

    demo_dir = Path(cfg.data.demo_dir).expanduser().resolve()
    if is_main:
        ready = (demo_dir / "stamp.json").is_file()
        if ready:
            say(f"demo set: {demo_dir} (data.demo_dir; made earlier, reused)")
        else:
            say(f"demo set: generating it once in {demo_dir} (data.demo_dir): rendering synthetic clips "
                "(no bar), then packing them into shards ('prepare train', 'prepare val' bars); "
                "later runs reuse it")
        from tgdp.data.synthetic import ensure_demo

        ensure_demo(demo_dir)
    barrier()
    return str(demo_dir / "train")


def write_loss_plot(out_dir: str | Path) -> str | None:
    """``<out_dir>/loss_curves.png`` from ``metrics.jsonl`` (tgdp.eval.plots); None if nothing was logged."""
    out = Path(out_dir)
    log = out / "metrics.jsonl"
    if not log.is_file() or log.stat().st_size == 0:
        return None
    from tgdp.eval.plots import plot_loss_curves

    keys = ["loss", "loss_rec", "loss_rec_a", "loss_rec_v", "loss_dis", "loss_con"]
    return str(plot_loss_curves(log, (out / "loss_curves.png").resolve(), keys=keys,
                                title="TG-DP training losses"))


def train(cfg: Config, progress: bool = True, *, demo: bool = False, origin: Origin | None = None) -> dict:
    """Train with an already validated config in this process (joins the torchrun group if any).

    ``demo``: without ``data.root``, use (and first generate) the demo set. Returns the Trainer's
    summary plus ``rank``, ``data_root`` and ``data_s`` (seconds spent making the data ready)."""
    from tgdp.training.distributed import init_distributed, shutdown
    from tgdp.training.header import model_lines, run_lines
    from tgdp.training.trainer import Trainer

    check_before_data(cfg, demo)
    info = init_distributed(cfg)
    try:
        t0 = time.perf_counter()
        root = resolve_data_root(cfg, info.is_main, demo)
        data_s = time.perf_counter() - t0
        if root is not None and root != cfg.data.root:
            # the saved config names the folder actually used (eval reads the split next to it)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
        data = check_data(cfg, root) if root is not None else DataSummary(None)
        if info.is_main:
            say("start-up", *(f"  {line}" for line in run_lines(cfg, origin, data, info.device, info.world_size)))
            say(_setup_text(cfg, data))
        t0 = time.perf_counter()
        trainer = Trainer(cfg, info, root, progress=progress)
        if info.is_main:
            say(f"set up in {time.perf_counter() - t0:.1f} s",
                *(f"  {line}" for line in model_lines(cfg, trainer.method.student, trainer.method.teacher.module,
                                                      info.device, trainer.total)),
                f"training: {trainer.total - trainer.step} steps to go (bar 'train'); metrics in "
                f"{Path(cfg.train.out_dir).resolve()}")
        summary = trainer.run()
        summary.update(rank=info.rank, data_root=root, data_s=data_s)
        if info.is_main:
            summary["loss_plot"] = write_loss_plot(cfg.train.out_dir)
        return summary
    finally:
        shutdown()


def _setup_text(cfg: Config, data: DataSummary) -> str:
    what = "building the model, the EMA teacher and the optimizer"
    if data.root is not None and cfg.data.cache_frames > 0:
        what += (f"; decoding the {data.num_samples} training clips once into memory ({cfg.data.cache_frames} of "
                 f"{cfg.data.frames_per_clip} frames each, fp16; data.cache_frames=0 streams instead)")
    elif data.root is not None:
        what += "; opening the shard loader"
    return what + " ..."
