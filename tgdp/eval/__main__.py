"""``python -m tgdp.eval {retrieval,probe,plot-log}``.

retrieval: checkpoint + shard folder -> per-frame features -> R@1/5/10 and MR (V->A, A->V),
    written to ``<out>/retrieval.json`` and ``<out>/retrieval.md``; ``--plots`` adds a t-SNE and
    top-5 examples. ``--features F`` evaluates saved features instead of running the model.
probe: checkpoint + train (and val) shard folders -> frozen features -> attention probe; the
    per-epoch metrics go to ``<out>/probe.json``.
plot-log: loss curves of a run log (JSON lines / JSON / CSV) -> PNG.

Dotted config overrides (``--eval.chunk 1024``, ``--data.num_workers 0``) may follow the flags;
they apply on top of the checkpoint's saved config (the model geometry always comes from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tgdp.configs import parse_cli_overrides
from tgdp.eval import common
from tgdp.atomic import atomic_write_json, atomic_write_text
from tgdp.eval.common import VideoFeatures
from tgdp.eval.retrieval import TIES, format_table, retrieval_metrics


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _features(ckpt: str, data: str | None, overrides: dict, device: torch.device,
              limit: bool = False, weights: str = "model") -> tuple[VideoFeatures, object]:
    """Frozen-encoder features of a shard folder; ``limit``: at most eval.retrieval_videos videos."""
    model, cfg = common.load_checkpoint(ckpt, overrides=overrides, device=device, weights=weights)
    loader = common.make_retrieval_loader(cfg, data, device=device)
    max_videos = cfg.eval.retrieval_videos if limit else None
    feats = common.extract_video_features(model, loader, cfg.data.frames_per_clip, max_videos, device)
    return feats, cfg


def run_retrieval(feats: VideoFeatures, out_dir: str | Path, chunk: int = 4096, ties: str = "official",
                  extra: dict | None = None) -> dict:
    """Metrics of ``feats`` (on their device) written atomically to out_dir/retrieval.{json,md}."""
    result = retrieval_metrics(feats.a, feats.v, chunk=chunk, ties=ties)
    result.update(extra or {})
    out = Path(out_dir)
    atomic_write_json(out / "retrieval.json", result)
    atomic_write_text(out / "retrieval.md", format_table(result) + "\n")
    return result


def run_probe(train: VideoFeatures, val: VideoFeatures, settings, out_dir: str | Path,
              device: torch.device | None = None, extra: dict | None = None) -> dict:
    """Train the probe on ``train``, evaluate on ``val`` per epoch; write out_dir/probe.json."""
    from tgdp.eval.probe import encode_labels, train_probe

    y_tr, classes = encode_labels(train.labels, settings.task)
    y_va, _ = encode_labels(val.labels, settings.task, classes)

    def log(rec: dict) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    res = train_probe((train.a, train.v, y_tr), (val.a, val.v, y_va), len(classes), settings, device, log)
    out = {"metric": res.metric, "best": res.best, "final": res.history[-1][res.metric],
           "history": res.history, "settings": res.settings, "classes": classes,
           "num_train": len(train.ids), "num_val": len(val.ids), **(extra or {})}
    atomic_write_json(Path(out_dir) / "probe.json", out)
    return out


def _subset(f: VideoFeatures, idx: list[int]) -> VideoFeatures:
    return VideoFeatures(f.a[idx], f.v[idx], [f.ids[i] for i in idx], [f.labels[i] for i in idx])


def _retrieval_plots(feats: VideoFeatures, cfg, data: str | None, out: Path) -> None:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tgdp.eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retrieval", help="zero-shot retrieval metrics")
    r.add_argument("--ckpt", help="training checkpoint (dict with 'model' and 'config')")
    r.add_argument("--data", default=None, help="shard folder (default: the checkpoint config's data.root)")
    r.add_argument("--features", default=None, help="saved features (.pt) to evaluate instead of --ckpt")
    r.add_argument("--out", default=None, help="output folder (default: <ckpt folder>/eval)")
    r.add_argument("--ties", default="official", choices=TIES)
    r.add_argument("--chunk", type=int, default=None, help="rows per similarity block (default eval.chunk)")
    r.add_argument("--device", default="auto")
    r.add_argument("--weights", choices=("model", "teacher"), default="model",
                   help="checkpoint weights: the student ('model') or the EMA teacher")
    r.add_argument("--save-features", action="store_true")
    r.add_argument("--plots", action="store_true", help="also write tsne.png and retrieval_a2v.png")
    p = sub.add_parser("probe", help="attention probe on frozen features")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default=None, help="training shard folder")
    p.add_argument("--val-data", default=None, help="validation shard folder (default: split --data)")
    p.add_argument("--val-frac", type=float, default=0.25)
    p.add_argument("--preset", choices=("vggsound", "audioset"), default="vggsound")
    p.add_argument("--modality", choices=("both", "audio", "video"), default="both")
    for name, tp in (("epochs", int), ("batch-size", int), ("lr", float), ("warmup-epochs", float),
                     ("mixup", float), ("seed", int), ("num-heads", int)):
        p.add_argument(f"--{name}", type=tp, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=("model", "teacher"), default="model")
    g = sub.add_parser("plot-log", help="loss curves of a run log")
    g.add_argument("--log", required=True)
    g.add_argument("--out", required=True, help="PNG path")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_cli_overrides(rest) if rest else {}

    if args.cmd == "plot-log":
        from tgdp.eval.plots import plot_loss_curves

        print(plot_loss_curves(args.log, args.out))
        return 0

    device = _device(args.device)
    if args.cmd == "retrieval":
        if (args.ckpt is None) == (args.features is None):
            ap.error("retrieval needs exactly one of --ckpt or --features")
        if args.plots and args.features:
            ap.error("--plots needs --ckpt (the config names the frame to plot)")
        src = Path(args.ckpt or args.features)
        out = Path(args.out) if args.out else src.parent / "eval"
        if args.features:
            feats, cfg = VideoFeatures.load(args.features), None
            chunk = args.chunk or 4096
        else:
            feats, cfg = _features(args.ckpt, args.data, overrides, device, limit=True, weights=args.weights)
            chunk = args.chunk or cfg.eval.chunk
            if args.save_features:
                feats.save(out / "features.pt")
        feats = VideoFeatures(feats.a.to(device), feats.v.to(device), feats.ids, feats.labels)
        res = run_retrieval(feats, out, chunk=chunk, ties=args.ties, extra={"source": str(src)})
        print(format_table(res))
        print(f"wrote {out / 'retrieval.json'}")
        if args.plots:
            _retrieval_plots(VideoFeatures(feats.a.cpu(), feats.v.cpu(), feats.ids, feats.labels),
                             cfg, args.data, out)
        return 0

    from tgdp.eval.probe import ProbeSettings, stratified_split

    kw = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "warmup_epochs", "mixup", "seed",
                                        "num_heads") if getattr(args, k) is not None}
    settings = getattr(ProbeSettings, args.preset)(modality=args.modality, **kw)
    train, cfg = _features(args.ckpt, args.data, overrides, device, weights=args.weights)
    if args.val_data:
        val, _ = _features(args.ckpt, args.val_data, overrides, device, weights=args.weights)
    else:
        tr_idx, va_idx = stratified_split(train.labels, args.val_frac, settings.seed)
        train, val = _subset(train, tr_idx), _subset(train, va_idx)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / "eval"
    res = run_probe(train, val, settings, out, device, extra={"ckpt": str(args.ckpt)})
    print(f"{res['metric']}: best {res['best']:.4f}, final {res['final']:.4f}; wrote {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
