"""python -m tgdp.eval {retrieval,probe,plot-log}: evaluate a pretrained checkpoint.

    python -m tgdp.eval retrieval --ckpt runs/tiny/checkpoints/step-00001000.pt --data DIR [--plots]
    python -m tgdp.eval probe --ckpt CKPT --data TRAIN_DIR --eval-data EVAL_DIR [--task audioset]
    python -m tgdp.eval plot-log --log runs/tiny/metrics.jsonl --out curves.png

retrieval: checkpoint + shard folder -> per-frame features -> R@1/5/10 and MR (V->A, A->V),
written to <out>/retrieval.json and <out>/retrieval.md; --plots adds a t-SNE and top-5 examples;
--features F evaluates saved features instead of running the model.
probe: checkpoint + training (and evaluation) shard folders -> frozen features -> the attention
probe of the config's probe section (--task, a --config TOML [probe] table, --probe.field value);
the reported figure (final model, or chosen on a carved training split) goes to <out>/probe.json.
plot-log: loss curves of a run log (JSON lines / JSON / CSV) -> PNG.

Checkpoints: training checkpoints (runs/<name>/checkpoints/step-*.pt) or official weights imported
with python -m tgdp.convert import. Dotted config overrides (--eval.chunk 1024,
--data.num_workers 0) may follow the flags; they apply on top of the checkpoint's saved config
(the model geometry always comes from it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tgdp.atomic import atomic_write_json, atomic_write_text, check_writable
from tgdp.cli import HelpFormatter, UserError, parser, run

if TYPE_CHECKING:
    import torch

    from tgdp.eval.common import VideoFeatures

PROG = "tgdp.eval"
TIES = ("official", "optimistic", "pessimistic")  # = tgdp.eval.retrieval.TIES (not imported: --help stays fast)


def _device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu (or auto)")
    return dev


def _check_inputs(ckpt: str | None, data: list[str | None]) -> None:
    """Fail in one line, before any model is built, on a missing checkpoint or shard folder."""
    if ckpt is not None and not Path(ckpt).is_file():
        what = "is a folder" if Path(ckpt).is_dir() else "does not exist"
        raise UserError(f"--ckpt {ckpt} {what}; give a checkpoint file (runs/<name>/checkpoints/step-*.pt "
                        "or one made by python -m tgdp.convert import)")
    from tgdp.data.shards import read_manifest

    for root in data:
        if root is None:
            continue
        if not Path(root).is_dir():
            raise UserError(f"--data {root}: no such folder; give a shard folder made by python -m tgdp.prepare")
        try:
            read_manifest(root)
        except ValueError as exc:
            raise UserError(f"--data {root}: {exc}") from None


def _features(ckpt: str, data: str | None, overrides: dict, device: "torch.device",
              limit: bool = False, weights: str = "model") -> tuple["VideoFeatures", object]:
    """Frozen-encoder features of a shard folder; ``limit``: at most eval.retrieval_videos videos."""
    from tgdp.eval import common

    model, cfg = common.load_checkpoint(ckpt, overrides=overrides, device=device, weights=weights)
    loader = common.make_retrieval_loader(cfg, data, device=device)
    max_videos = cfg.eval.retrieval_videos if limit else None
    feats = common.extract_video_features(model, loader, cfg.data.frames_per_clip, max_videos, device)
    return feats, cfg


def run_retrieval(feats: "VideoFeatures", out_dir: str | Path, chunk: int = 4096, ties: str = "official",
                  extra: dict | None = None) -> dict:
    """Metrics of ``feats`` (on their device) written atomically to out_dir/retrieval.{json,md}."""
    from tgdp.eval.retrieval import format_table, retrieval_metrics

    result = retrieval_metrics(feats.a, feats.v, chunk=chunk, ties=ties)
    result.update(extra or {})
    out = Path(out_dir)
    atomic_write_json(out / "retrieval.json", result)
    atomic_write_text(out / "retrieval.md", format_table(result) + "\n")
    return result


def run_probe(train: "VideoFeatures", evaluation: "VideoFeatures", probe, out_dir: str | Path,
              device: "torch.device | None" = None, extra: dict | None = None) -> dict:
    """Train the probe (``probe``: a :class:`tgdp.configs.ProbeConfig`) on ``train``, report its figure
    on ``evaluation``; write out_dir/probe.json."""
    from tgdp.eval.probe import encode_labels, train_probe

    y_tr, classes = encode_labels(train.labels, probe.task)
    y_ev, _ = encode_labels(evaluation.labels, probe.task, classes)

    def log(rec: dict) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    res = train_probe((train.a, train.v, y_tr), (evaluation.a, evaluation.v, y_ev), len(classes), probe,
                      device, log)
    out = {"metric": res.metric, "result": res.result, "chosen": res.chosen, "history": res.history,
           "settings": res.settings, "classes": classes, "num_train": res.num_train,
           "num_select": res.num_select, "num_eval": len(evaluation.ids), **(extra or {})}
    atomic_write_json(Path(out_dir) / "probe.json", out)
    return out


def _probe_config(cfg, task: str | None, file: str | None, shortcuts: dict, overrides: dict,
                  check: bool = True):
    """The probe section: checkpoint config -> ``--task`` column -> ``--config`` [probe] table ->
    shortcut flags -> ``--probe.*`` overrides; validated unless ``check`` is false (keys and types
    are checked either way)."""
    import dataclasses
    import tomllib

    from tgdp.configs import ConfigError, apply_overrides, from_dict, probe_task

    if task is not None:
        cfg = dataclasses.replace(cfg, probe=probe_task(task, cfg.probe))
    if file is not None:
        if not Path(file).is_file():
            raise UserError(f"--config {file} does not exist; give a TOML file with a [probe] table")
        with open(file, "rb") as fh:
            try:
                table = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{file} is not valid TOML: {exc}") from None
        other = sorted(set(table) - {"probe"})
        if other:
            raise ConfigError(f"{file}: a probe config holds only a [probe] table, found {other}")
        cfg = from_dict(table, base=cfg)
    cfg = apply_overrides(cfg, {**{f"probe.{k}": v for k, v in shortcuts.items()}, **overrides})
    if check:
        cfg.probe.validate()
    return cfg.probe


def _probe_features(model, cfg, data: str | None, device: "torch.device") -> "VideoFeatures":
    """Frozen per-frame features of a shard folder (``model``: a ProbeFeatures wrapper)."""
    from tgdp.eval import common

    loader = common.make_retrieval_loader(cfg, data, device=device)
    return common.extract_video_features(model, loader, cfg.data.frames_per_clip, None, device)


def _subset(f: "VideoFeatures", idx: list[int]) -> "VideoFeatures":
    from tgdp.eval.common import VideoFeatures

    return VideoFeatures(f.a[idx], f.v[idx], [f.ids[i] for i in idx], [f.labels[i] for i in idx])


def _retrieval_plots(feats: "VideoFeatures", cfg, data: str | None, out: Path) -> None:
    from tgdp.eval.plots import load_thumbnails, plot_retrieval_examples, plot_tsne
    from tgdp.eval.retrieval import similarity_matrix

    k = cfg.data.eval_frame
    labels = [lab[0] if lab else "?" for lab in feats.labels]
    n_show = min(len(feats.ids), 2000)
    plot_tsne(feats.a[:n_show, k], feats.v[:n_show, k], labels[:n_show], out / "tsne.png")
    root = data or cfg.data.root or str(Path(cfg.data.demo_dir).expanduser() / "val")  # the loader's default
    if not (Path(root) / "manifest.json").is_file():
        print(f"retrieval examples skipped: {root} is not a shard folder (no manifest.json)")
        return
    thumbs = load_thumbnails(root, feats.ids, frame=k)
    sim = similarity_matrix(feats.a, feats.v)          # A->V: audio queries, video candidates
    queries = list(range(min(4, len(feats.ids))))
    plot_retrieval_examples(sim, thumbs, thumbs, queries, out / "retrieval_a2v.png",
                            k=min(5, len(feats.ids)), labels=labels, query_title="audio of")


def _parser():
    doc = __doc__.split("\n\n")
    ap = parser(PROG, "\n\n".join(doc[:3]), epilog=doc[3])
    # one description per subcommand: its "name: ..." block of the docstring's third paragraph
    blocks = re.split(r"\n(?=(?:retrieval|probe|plot-log): )", doc[2])
    desc = {b.split(":", 1)[0]: b.strip() for b in blocks}
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{retrieval,probe,plot-log}")
    common = dict(formatter_class=HelpFormatter, allow_abbrev=False)
    r = sub.add_parser("retrieval", help="zero-shot retrieval metrics", description=desc["retrieval"], **common)
    r.add_argument("--ckpt", metavar="FILE", help="checkpoint (training, or from python -m tgdp.convert import)")
    r.add_argument("--data", default=None, metavar="DIR",
                   help="shard folder (default: the checkpoint config's data.root)")
    r.add_argument("--features", default=None, metavar="FILE",
                   help="saved features (.pt, from --save-features) to evaluate instead of --ckpt")
    r.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <ckpt folder>/eval)")
    r.add_argument("--ties", default="official", choices=TIES,
                   help="rank of tied scores: official (pooled entries, as the released code), optimistic "
                        "or pessimistic (one rank per query)")
    r.add_argument("--chunk", type=int, default=None, help="rows per similarity block (default: eval.chunk)")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    r.add_argument("--weights", choices=("model", "teacher"), default="model",
                   help="checkpoint weights: the student ('model') or the EMA teacher")
    r.add_argument("--save-features", action="store_true", help="also write <out>/features.pt")
    r.add_argument("--plots", action="store_true", help="also write tsne.png and retrieval_a2v.png")
    p = sub.add_parser("probe", help="attention probe on frozen features", description=desc["probe"], **common)
    p.add_argument("--ckpt", required=True, metavar="FILE",
                   help="checkpoint (training, or from python -m tgdp.convert import)")
    p.add_argument("--data", default=None, metavar="DIR", help="training shard folder of the probe")
    p.add_argument("--eval-data", "--val-data", dest="eval_data", default=None, metavar="DIR",
                   help="evaluation shard folder, where the figure is reported (default: a stratified "
                        "--eval-frac split of --data)")
    p.add_argument("--eval-frac", "--val-frac", dest="eval_frac", type=float, default=0.25,
                   help="share of --data held out for evaluation when no --eval-data")
    p.add_argument("--task", choices=("vggsound", "audioset"), default=None,
                   help="supplement Table 1 column for the probe section: vggsound = single-label top-1, "
                        "audioset = multi-label mAP (default: the checkpoint config's probe section)")
    p.add_argument("--config", default=None, metavar="FILE", help="TOML file whose [probe] table applies")
    for name, tp, what in (("head", str, "official (the released CAVMAEFT head) or tokens"),
                           ("modality", str, "frozen features the probe reads: both, audio or video"),
                           ("epochs", int, "training epochs"), ("batch-size", int, "videos per batch"),
                           ("lr", float, "peak learning rate"), ("warmup-epochs", float, "linear warmup"),
                           ("mixup", float, "probability of mixing a sample, 0 = off"),
                           ("seed", int, "seed of the probe and of the splits"),
                           ("num-heads", int, "attention heads of the probe")):
        p.add_argument(f"--{name}", type=tp, default=None,
                       help=f"{what} (= --probe.{name.replace('-', '_')})")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <ckpt folder>/eval)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--weights", choices=("model", "teacher"), default="model",
                   help="checkpoint weights: the student ('model') or the EMA teacher")
    g = sub.add_parser("plot-log", help="loss curves of a run log", description=desc["plot-log"], **common)
    g.add_argument("--log", required=True, metavar="FILE", help="metrics.jsonl / .json / .csv of a run")
    g.add_argument("--out", required=True, metavar="PNG", help="PNG path to write")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    return ap


def _main(argv: list[str]) -> int:
    from tgdp.configs import parse_cli_overrides

    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    overrides = parse_cli_overrides(rest) if rest else {}

    if args.cmd == "plot-log":
        if not Path(args.log).is_file():
            what = "is a folder" if Path(args.log).is_dir() else "does not exist"
            raise UserError(f"--log {args.log} {what}; give a run's metrics.jsonl (or .json / .csv)")
        from tgdp.eval.plots import plot_loss_curves

        print(plot_loss_curves(args.log, args.out))
        return 0

    if args.cmd == "retrieval":
        return _retrieval(args, overrides)
    return _probe(args, overrides)


def _retrieval(args, overrides: dict) -> int:
    if (args.ckpt is None) == (args.features is None):
        raise UserError("retrieval needs exactly one of --ckpt or --features; see python -m tgdp.eval retrieval --help")
    if args.plots and args.features:
        raise UserError("--plots needs --ckpt (the config names the frame to plot); drop --plots or use --ckpt")
    _check_inputs(args.ckpt, [args.data])
    if args.features and not Path(args.features).is_file():
        raise UserError(f"--features {args.features} does not exist; give a file written by --save-features")
    device = _device(args.device)
    from tgdp.eval.common import VideoFeatures
    from tgdp.eval.retrieval import format_table

    src = Path(args.ckpt or args.features)
    out = Path(args.out) if args.out else src.parent / "eval"
    check_writable(out)   # before any compute
    if args.features:
        feats, cfg = VideoFeatures.load(args.features), None
        chunk = args.chunk or 4096
    else:
        feats, cfg = _features(args.ckpt, args.data, overrides, device, limit=True, weights=args.weights)
        chunk = args.chunk or cfg.eval.chunk
        if args.save_features:
            feats.save(out / "features.pt")
    feats = VideoFeatures(feats.a.to(device), feats.v.to(device), feats.ids, feats.labels, feats.coverage)
    res = run_retrieval(feats, out, chunk=chunk, ties=args.ties,
                        extra={"source": str(src), "coverage": feats.coverage})
    print(format_table(res))
    print(f"wrote {out / 'retrieval.json'}")
    if args.plots:
        _retrieval_plots(VideoFeatures(feats.a.cpu(), feats.v.cpu(), feats.ids, feats.labels),
                         cfg, args.data, out)
    return 0


def _probe(args, overrides: dict) -> int:
    _check_inputs(args.ckpt, [args.data, args.eval_data])
    if not 0 < args.eval_frac < 1:
        raise UserError(f"--eval-frac {args.eval_frac} must be in (0, 1)")
    from tgdp.configs import tgdp as tgdp_preset
    from tgdp.eval import common
    from tgdp.eval.probe import stratified_split
    from tgdp.eval.probe_features import ProbeFeatures

    shortcuts = {k: getattr(args, k) for k in ("head", "modality", "epochs", "batch_size", "lr",
                                               "warmup_epochs", "mixup", "seed", "num_heads")
                 if getattr(args, k) is not None}
    # probe.* overrides apply after --task and --config; the others to the checkpoint's config
    probe_over = {k: v for k, v in overrides.items() if k.startswith("probe.")}
    model_over = {k: v for k, v in overrides.items() if not k.startswith("probe.")}
    _probe_config(tgdp_preset(), args.task, args.config, shortcuts, probe_over, check=False)  # keys, types: early
    device = _device(args.device)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / "eval"
    check_writable(out)   # before any compute
    model, cfg = common.load_checkpoint(args.ckpt, overrides=model_over, device=device, weights=args.weights)
    probe = _probe_config(cfg, args.task, args.config, shortcuts, probe_over)
    feats = ProbeFeatures(model, probe.head, probe.modality)
    train = _probe_features(feats, cfg, args.data, device)
    coverage = {"train": train.coverage}
    if args.eval_data:
        evaluation = _probe_features(feats, cfg, args.eval_data, device)
        coverage["eval"] = evaluation.coverage
    else:
        tr_idx, ev_idx = stratified_split(train.labels, args.eval_frac, probe.seed)
        train, evaluation = _subset(train, tr_idx), _subset(train, ev_idx)
    res = run_probe(train, evaluation, probe, out, device, extra={"ckpt": str(args.ckpt), "coverage": coverage})
    print(f"{res['metric']}: {res['result']:.4f} on {res['num_eval']} evaluation clips ({res['chosen']}); "
          f"wrote {out / 'probe.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.eval``: expected errors are one line and exit status 2."""
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
