"""gpucheck steps "shards" and "data": generated shards; the DALI pipeline against the torch loader.

"shards" (:func:`make_shards`) builds the embedded demo corpus with
:func:`tgdp.data.synthetic.ensure_demo` (rendered clips through :func:`tgdp.prepare.prepare`) in the
shard cache, once: a cache whose stamp matches is reused. It is built in a private folder and
renamed into place, so a killed run never leaves a half-written cache behind.

"data" (:func:`run`) reads the held-out split with both loaders in eval mode (frame 8 of every clip)
and compares them row by row (same clip ids, same frames): the audio windows (same FLAC samples, the
same torch log-Mel code, on the GPU for DALI), the frames (nvJPEG vs libjpeg-turbo: decoders may
differ by a few levels, hence the tolerance), the valid audio columns the host masks need. On a GPU
DALI's frames and audio must arrive on the GPU (``"mixed"`` decoder). Then one training batch through
:func:`tgdp.data.loader.make_loader` with ``data.loader = "dali"``, as the training run uses it.
"""

from __future__ import annotations

import json
import os
import time

from tgdp.gpucheck.common import Context, result

__all__ = ["make_shards", "run"]


def make_shards(ctx: Context) -> dict:
    from tgdp.data.shards import read_manifest
    from tgdp.data.synthetic import ensure_demo

    s, root = ctx.settings, ctx.shards
    want = (s["n_train"], s["n_val"])
    stamp = root / "stamp.json"
    t0 = time.perf_counter()
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    if (have.get("n_train"), have.get("n_val")) == want:
        ctx.progress("reuse")
        ensure_demo(root, n_train=want[0], n_val=want[1], progress=False)   # returns at once if complete
        reused = True
    elif root.exists():
        return result(False, f"{root} holds other data (no matching stamp.json); pass another --shards folder")
    else:
        ctx.progress("generate", clips=sum(want))
        tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
        ensure_demo(tmp, n_train=want[0], n_val=want[1], workers=os.cpu_count() or 1, progress=False)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "stamp.json").exists():   # not a concurrent run's identical cache: a real error
                raise
        reused = False
    n = {split: read_manifest(root / split)["num_samples"] for split in ("train", "val")}
    if (n["train"], n["val"]) != want:
        return result(False, f"{root}: {n} clips, expected train={want[0]}, val={want[1]} (skipped clips: see "
                             f"{root}/train/skipped.json)", clips=n)
    dt = time.perf_counter() - t0
    how = "reused" if reused else f"generated in {dt:.1f} s"
    return result(True, f"{n['train']} + {n['val']} clips in {root} ({how})", clips=n, reused=reused,
                  seconds=round(dt, 2), root=str(root))


def _rows(batches) -> dict:
    out = {}
    for b in batches:
        for j, f in enumerate(b.frame_idx.tolist()):
            out[(b.ids[j], f)] = (b.audio[j].float().cpu(), b.frames[j].float().cpu(), int(b.audio_valid[j]))
    return out


def run(ctx: Context) -> dict:
    import torch
    from tgdp.configs import apply_overrides, paper
    from tgdp.data.dali import DaliLoader, dali_available
    from tgdp.data.loader import ShardDataset, TorchLoader, make_loader

    if not dali_available():
        return result(False, "nvidia.dali is not importable: pip install -e '.[gpu]' (or '.[dali]')")
    s, dev = ctx.settings, ctx.device
    cfg = paper()
    d, img = cfg.data, cfg.model.img_size
    val = ctx.shards / "val"
    threads = max(1, min(8, os.cpu_count() or 1))
    ctx.progress("torch loader")
    t0 = time.perf_counter()
    torch_rows = _rows(TorchLoader(ShardDataset(val, "eval", data=d, img_size=img), s["batch"]))
    t_torch = time.perf_counter() - t0
    ctx.progress("dali loader")
    t0 = time.perf_counter()
    dali_batches = list(DaliLoader(val, "eval", data=d, img_size=img, batch_size=s["batch"], device=dev,
                                   num_threads=threads))
    if not ctx.smoke:
        torch.cuda.synchronize()
    t_dali = time.perf_counter() - t0
    placement = sorted({f"frames:{b.frames.device.type}" for b in dali_batches} |
                       {f"audio:{b.audio.device.type}" for b in dali_batches})
    dali_rows = _rows(dali_batches)
    problems = []
    if set(torch_rows) != set(dali_rows) or not torch_rows:
        problems.append(f"different rows: {len(torch_rows)} torch vs {len(dali_rows)} DALI")
    keys = sorted(set(torch_rows) & set(dali_rows))
    if not keys:
        return result(False, "; ".join(problems) or "no rows", placement=placement)
    audio_err = max(float((torch_rows[k][0] - dali_rows[k][0]).abs().max()) for k in keys)
    fdiff = torch.stack([(torch_rows[k][1] - dali_rows[k][1]).abs() for k in keys])
    frame_max, frame_mean = float(fdiff.max()), float(fdiff.mean())
    valid_same = all(torch_rows[k][2] == dali_rows[k][2] for k in keys)
    if audio_err > s["audio_tol"]:
        problems.append(f"audio max diff {audio_err:.2e} > {s['audio_tol']:g}")
    if frame_max > s["frame_tol_max"] or frame_mean > s["frame_tol_mean"]:
        problems.append(f"frames max/mean diff {frame_max:.3g}/{frame_mean:.3g} > "
                        f"{s['frame_tol_max']:g}/{s['frame_tol_mean']:g}")
    if not valid_same:
        problems.append("valid audio columns differ")
    want_dev = dev.type
    if placement != sorted({f"frames:{want_dev}", f"audio:{want_dev}"}):
        problems.append(f"DALI batches on {placement}, expected {want_dev}")

    ctx.progress("train loader")
    tcfg = apply_overrides(cfg, {"data.loader": "dali", "data.root": str(ctx.shards / "train"),
                                 "data.num_workers": threads, "train.batch_size": s["batch"]})
    loader = make_loader(tcfg, "train", device=dev)
    first = next(iter(loader))
    m = cfg.model
    train_ok = (loader.backend == "dali" and tuple(first.audio.shape) == (s["batch"], m.audio_length, m.n_mels)
                and tuple(first.frames.shape) == (s["batch"], 3, img, img) and first.audio_valid is not None
                and first.frames.device.type == want_dev)
    if not train_ok:
        problems.append(f"train batch: backend {loader.backend}, audio {tuple(first.audio.shape)}, frames "
                        f"{tuple(first.frames.shape)} on {first.frames.device}, audio_valid "
                        f"{'missing' if first.audio_valid is None else 'present'}")
    summary = (f"{len(keys)} clips equal: audio max diff {audio_err:.1e}, frames max/mean {frame_max:.3f}/"
               f"{frame_mean:.4f}, valid columns {'equal' if valid_same else 'DIFFER'}; DALI on {want_dev}; "
               f"{len(keys) / t_torch:.0f} vs {len(keys) / t_dali:.0f} clips/s (torch/DALI, incl. start-up)")
    if problems:
        summary = "; ".join(problems)
    return result(not problems, summary, rows=len(keys), audio_max_diff=audio_err, frame_max_diff=frame_max,
                  frame_mean_diff=frame_mean, valid_columns_equal=valid_same, placement=placement,
                  torch_s=round(t_torch, 2), dali_s=round(t_dali, 2), dali_threads=threads,
                  train_batch_ok=train_ok)
