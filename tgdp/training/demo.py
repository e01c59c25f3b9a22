"""The main job (``python -m tgdp.train`` with no arguments), end to end on a CPU:

1. generate the embedded demo set once (``tgdp.data.synthetic.ensure_demo``, cached by a stamp;
   the folder is announced);
2. pretrain ``tiny()`` on its ``train`` split (the ordinary training run of
   :func:`tgdp.training.launch.train`, checkpoints included; under torchrun on every rank);
3. zero-shot retrieval on the held-out ``val`` split with the trained student (``tgdp.eval``);
4. write ``report.json`` + ``report.md`` (R@1/5/10 both directions next to chance level), loss
   curves and a t-SNE of the val globals, and print where they are. Steps 3 and 4 run on rank 0.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tgdp.configs import Config, to_dict
from tgdp.atomic import atomic_write_json, atomic_write_text

__all__ = ["run_demo", "chance_recall", "format_report"]


def chance_recall(n: int, k: int) -> float:
    """R@k (percent) of a random ranking over ``n`` candidates: min(k, n) / n."""
    return 100.0 * min(k, n) / n


def format_report(res: dict) -> str:
    n = res["retrieval"]["num_videos"]
    lines = ["# TG-DP demo: zero-shot retrieval on the held-out split", "",
             f"{n} held-out videos x {res['retrieval']['num_frames']} frames; {res['train']['steps']} "
             f"training steps in {res['train']['wall_s']:.0f} s ({res['device']}); "
             f"total wall time {res['wall_s']:.0f} s.", "",
             "| direction | R@1 | R@5 | R@10 | MR |", "|---|---|---|---|---|"]
    for key, name in (("v2a", "video -> audio"), ("a2v", "audio -> video")):
        m = res["retrieval"][key]
        lines.append(f"| {name} | {m['R@1']:.2f} | {m['R@5']:.2f} | {m['R@10']:.2f} | {m['MR']:g} |")
    ch = res["chance"]
    lines.append(f"| chance | {ch['R@1']:.2f} | {ch['R@5']:.2f} | {ch['R@10']:.2f} | {(n + 1) / 2:g} |")
    lines += ["", "Recall in percent; MR = median rank (1 = best).", ""]
    return "\n".join(lines)


def run_demo(cfg: Config, progress: bool = True, origin=None) -> dict | None:
    """Run the main job with ``cfg`` (``tiny()`` plus overrides); returns the report dict on rank 0,
    None on the other ranks of a torchrun job."""
    import torch

    from tgdp.eval import common
    from tgdp.eval.plots import plot_tsne
    from tgdp.eval.retrieval import retrieval_metrics
    from tgdp.training.launch import say, train

    t0 = time.perf_counter()
    summary = train(cfg, progress=progress, demo=True, origin=origin)
    if summary["rank"] != 0:
        return None
    root = summary["data_root"]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    out = Path(cfg.train.out_dir).resolve()
    val = str(Path(root).parent / "val")
    say(f"evaluating zero-shot retrieval of {summary['checkpoint']} on the held-out split {val}")
    model, ecfg = common.load_checkpoint(summary["checkpoint"], device="cpu")
    torch.set_grad_enabled(False)
    loader = common.make_retrieval_loader(ecfg, val)
    feats = common.extract_video_features(model, loader, ecfg.data.frames_per_clip,
                                          ecfg.eval.retrieval_videos, "cpu")
    torch.set_grad_enabled(True)
    ret = retrieval_metrics(feats.a, feats.v, chunk=ecfg.eval.chunk)
    n = ret["num_videos"]
    k = ecfg.data.eval_frame
    labels = [lab[0] if lab else "?" for lab in feats.labels]
    say("plotting a t-SNE of the held-out globals")
    tsne = plot_tsne(feats.a[:, k], feats.v[:, k], labels, out / "tsne_val.png",
                     title="held-out globals (audio o, video ^)")
    res = {"retrieval": ret, "chance": {f"R@{kk}": chance_recall(n, kk) for kk in (1, 5, 10)},
           "train": {key: summary[key] for key in ("steps", "wall_s", "samples_per_s", "nonfinite_steps")},
           "last_log": summary.get("last"), "data_wall_s": summary["data_s"], "wall_s": time.perf_counter() - t0,
           "device": summary["device"], "checkpoint": summary["checkpoint"], "val_root": val,
           "config": to_dict(cfg),
           "plots": {"loss_curves": summary.get("loss_plot"), "tsne": str(tsne)}}
    res["report_json"] = str(out / "report.json")
    res["report_md"] = str(out / "report.md")
    atomic_write_json(out / "report.json", res)
    md = format_report(res)
    atomic_write_text(out / "report.md", md)
    print(md)
    return res
