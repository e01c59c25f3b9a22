"""Cost of an ablation study, in CPU seconds of ONE thread (robust on a shared, loaded machine).

    python benchmarks/ablation_cost.py [--data ~/.cache/tgdp/ablation] [--out cost.json]

Wall time on a shared machine says little (other work, and 2 intra-op threads on a loaded 2-core
box ran 10x slower than 1), so this measures process CPU time with one intra-op thread and no
loader workers, which is what ``python -m tgdp.ablate --jobs 2`` spends per core:

- training, per variant (``tiny`` + the variant, batch 32, the corpus' training split): two runs of
  ``s1`` and ``s2`` steps from scratch; CPU per step = (cpu(s2) - cpu(s1)) / (s2 - s1), the rest of
  cpu(s1) is the fixed cost (model build, decoding the split into the frame cache);
- evaluation: features (16 frames per clip) of ``--clips`` held-out and training clips with a trained
  checkpoint -> CPU per clip; the probe (10 epochs) on random features of the real shape.

Projection for a plan (variants x seeds x steps) on an idle 2-core machine: total CPU / 2 (two runs
at once, one thread each). The main job's measured 355 s for 1,000 ``tgdp`` steps on 2 idle cores
(README) is the check on that projection.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

VARIANTS = ("baseline", "dual_random", "tgdp")


def _cfg(variant: str, root: str, steps: int, out: str):
    from tgdp.ablate.variants import BUILTIN, resolve
    from tgdp.configs import apply_overrides, tiny

    cfg = resolve(tiny(), BUILTIN[variant])
    return apply_overrides(cfg, {"train.steps": steps, "train.out_dir": out, "data.root": root,
                                 "data.num_workers": 0, "train.ckpt_every": steps, "train.log_every": 2}).validate()


def train_cost(variant: str, root: str, s1: int, s2: int, tmp: str) -> dict:
    from tgdp.train import train

    cpu = {}
    for s in (s1, s2):
        t0 = time.process_time()
        summary = train(_cfg(variant, root, s, f"{tmp}/{variant}-{s}"), progress=False)
        cpu[s] = time.process_time() - t0
    per_step = (cpu[s2] - cpu[s1]) / (s2 - s1)
    return {"cpu_per_step_s": per_step, "fixed_cpu_s": cpu[s1] - s1 * per_step, "cpu": cpu,
            "checkpoint": summary["checkpoint"]}


def eval_cost(ckpt: str, val: str, train_root: str, clips: int) -> dict:
    from tgdp.eval import common
    from tgdp.eval.probe import ProbeSettings, train_probe

    model, cfg = common.load_checkpoint(ckpt, device="cpu")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    out = {}
    for name, root in (("val", val), ("train", train_root)):
        t0 = time.process_time()
        feats = common.extract_video_features(model, common.make_retrieval_loader(cfg, root),
                                              cfg.data.frames_per_clip, clips, "cpu")
        out[f"{name}_cpu_per_clip_s"] = (time.process_time() - t0) / len(feats.ids)
    g = torch.Generator().manual_seed(0)
    d = cfg.model.embed_dim
    tr = (torch.randn(400, 16, d, generator=g), torch.randn(400, 16, d, generator=g),
          torch.randint(0, 10, (400,), generator=g))
    va = (torch.randn(1000, 16, d, generator=g), torch.randn(1000, 16, d, generator=g),
          torch.randint(0, 10, (1000,), generator=g))
    t0 = time.process_time()
    train_probe(tr, va, 10, ProbeSettings(), "cpu")
    out["probe_cpu_s"] = time.process_time() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="~/.cache/tgdp/ablation", help="corpus folder with train/ and val/")
    ap.add_argument("--steps", default="4,24", help="s1,s2 training steps")
    ap.add_argument("--clips", type=int, default=48, help="clips per split for the evaluation cost")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data).expanduser()
    s1, s2 = (int(x) for x in args.steps.split(","))
    res: dict = {"threads": torch.get_num_threads(), "steps": [s1, s2], "clips": args.clips, "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            res["train"][v] = train_cost(v, str(data / "train"), s1, s2, tmp)
            print(v, json.dumps({k: round(x, 3) for k, x in res["train"][v].items() if isinstance(x, float)}),
                  flush=True)
        res["eval"] = eval_cost(res["train"]["tgdp"]["checkpoint"], str(data / "val"), str(data / "train"),
                                args.clips)
    print("eval", json.dumps({k: round(x, 4) for k, x in res["eval"].items()}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
