"""The embedded demo set: a small audio-visual correspondence corpus made locally in seconds.

    python -m tgdp.data.synthetic [--out DIR] [--n 400] [--n-val 64] [--seed 0] [--classes 10] [--workers N]

Each of the :data:`CLASSES` is an object with its own colour and shape that sounds with its own
pitch, timbre and rhythm. Within a clip everything that makes it unique is shared by both
modalities, so even clips of one class can be told apart (retrieval):

- the object drifts along a random smooth path; its height sets the pitch (higher = up to
  +2 semitones, lower = down to −2), its size sets the loudness;
- it pulses with the class rhythm, visible as brightness and audible as the envelope;
- it disappears for random stretches, and the sound stops with it (silent stretches);
- the background (a random colour gradient and drifting grey distractor shapes) is unrelated to
  the sound.

Clips are 10 s MJPEG (+ 16 kHz PCM) .mkv videos at 128×128 and 8 fps, which DALI's CPU video decoder
also reads. They go through :func:`tgdp.prepare.prepare` into ``<out>/train`` and ``<out>/val``
(labels = class names; ``val`` is the held-out retrieval split), then the videos are deleted.
``<out>/stamp.json`` records the settings: a second call with the same settings does nothing.

``seed`` draws the corpus (every clip's path, rhythm phase, background, distractors) and
``n_classes`` (1 … 10) keeps the first classes of :data:`CLASSES`, clip ``i`` of a split being of
class ``i mod n_classes``; see :func:`demo_plan`. The defaults (seed 0, 10 classes, 400 + 64 clips)
are the main job's demo set, and stay byte-identical: its published figures depend on them. The
ablation study (``python -m tgdp.ablate``) uses the same training clips with a held-out split of
1,000 clips (``--n-val 1000``; the first 64 are the demo's ``val`` clips).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import sys
from fractions import Fraction
from pathlib import Path

from tgdp.configs import DataConfig
from tgdp.atomic import atomic_write_json
from tgdp.data.shards import read_manifest

__all__ = ["CLASSES", "GEN_VERSION", "brightness", "render_clip", "write_video", "demo_plan", "ensure_demo",
           "main"]

GEN_VERSION = 1
# (name, RGB colour, shape, fundamental Hz, timbre, rhythm period s or 0 = steady)
CLASSES = [
    ("red_disc", (230, 40, 40), "disc", 220.0, "sine", 0.0),
    ("orange_square", (245, 140, 20), "square", 277.2, "odd", 0.25),
    ("yellow_triangle", (235, 225, 40), "triangle", 329.6, "saw", 0.5),
    ("green_ring", (40, 200, 60), "ring", 392.0, "sine", 0.25),
    ("cyan_cross", (40, 220, 230), "cross", 466.2, "odd", 0.0),
    ("blue_diamond", (50, 80, 240), "diamond", 554.4, "saw", 0.0),
    ("purple_hbar", (150, 60, 220), "hbar", 659.3, "sine", 0.5),
    ("magenta_vbar", (235, 50, 200), "vbar", 784.0, "odd", 0.5),
    ("white_frame", (240, 240, 240), "frame", 932.3, "saw", 0.25),
    ("olive_dots", (150, 160, 40), "dots", 1108.7, "odd", 0.125),
]
SECONDS, FPS, SIZE, SAMPLE_RATE = 10.0, 8, 128, 16000
PULSE_LOW = 0.25         # rhythm envelope between pulses (sound amplitude factor)


def brightness(pulse):
    """Object colour factor for a rhythm envelope value: 1 on a pulse, 0.5875 between pulses."""
    return 0.45 + 0.55 * pulse


def _path(rng, t, lo: float, hi: float):
    """A smooth random path in [lo, hi] at times ``t`` (two slow sinusoids, random phase)."""
    import numpy as np
    f = rng.uniform(0.04, 0.25, 2)
    ph = rng.uniform(0, 2 * np.pi, 2)
    w = rng.uniform(0.3, 0.7)
    u = w * np.sin(2 * np.pi * f[0] * t + ph[0]) + (1 - w) * np.sin(2 * np.pi * f[1] * t + ph[1])
    return lo + (hi - lo) * (0.5 + 0.5 * u)


def _visible(rng, t):
    """On/off pattern: on 1–3 s, off 0.4–1.5 s, random start state; ``t`` → bool."""
    import numpy as np
    edges, state, now = [], bool(rng.random() < 0.7), -rng.uniform(0, 1.0)
    states = []
    while now < SECONDS:
        states.append(state)
        now += rng.uniform(1.0, 3.0) if state else rng.uniform(0.4, 1.5)
        edges.append(now)
        state = not state
    return np.asarray(states)[np.searchsorted(np.asarray(edges), t, side="right")]


def render_clip(cls: int, seed: int):
    """Render one clip of class ``cls``: ``(frames [T, S, S, 3] uint8, audio [N] float32)``."""
    import numpy as np
    if not 0 <= cls < len(CLASSES):
        raise ValueError(f"class index {cls} not in [0, {len(CLASSES)})")
    name, colour, shape, f0, timbre, period = CLASSES[cls]
    rng = np.random.default_rng(seed)
    ta = np.arange(int(SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    tv = np.arange(int(SECONDS * FPS)) / FPS
    # One seed per random process, so that evaluating it at audio and at video times agrees.
    sx, sy, sr, sv = (int(v) for v in rng.integers(0, 2**31, 4))
    xs = lambda t: _path(np.random.default_rng(sx), t, 0.3, 0.7)     # noqa: E731
    ys = lambda t: _path(np.random.default_rng(sy), t, 0.25, 0.75)   # noqa: E731
    rs = lambda t: _path(np.random.default_rng(sr), t, 0.09, 0.16)   # noqa: E731
    vis = lambda t: _visible(np.random.default_rng(sv), t)           # noqa: E731
    phase0 = rng.uniform(0, period) if period else 0.0

    def pulse(t):  # rhythm envelope: 1 for the first 60 % of each period, PULSE_LOW after
        if not period:
            return np.ones_like(t)
        return np.where(((t + phase0) % period) < 0.6 * period, 1.0, PULSE_LOW)

    # ---- audio: pitch follows height (up = higher), loudness follows size
    freq = f0 * 2.0 ** ((0.5 - ys(ta)) * 8.0 / 12.0)
    phi = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    harmonics = {"sine": [1], "odd": [1, 3, 5, 7], "saw": [1, 2, 3, 4, 5, 6]}[timbre]
    wave = sum(np.sin(n * phi) / n for n in harmonics)
    env = vis(ta).astype(np.float64)
    ramp = np.hanning(161)[:80]  # 5 ms fades so on/off edges do not click
    env = np.convolve(env, np.concatenate([ramp, ramp[::-1]]) / ramp.sum() / 2, mode="same")
    amp = env * pulse(ta) * (rs(ta) / 0.16)
    audio = 0.5 * amp * wave / max(np.abs(wave).max(), 1e-9)

    # ---- video: background gradient + grey distractors + the object
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    c1, c2 = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)
    direction = rng.uniform(0, 2 * np.pi)
    g = (np.cos(direction) * xx + np.sin(direction) * yy)
    g = (g - g.min()) / (g.max() - g.min())
    background = c1 + (c2 - c1) * g[..., None]
    distractors = [(rng.uniform(0.1, 0.9, 2), rng.uniform(-0.03, 0.03, 2), rng.uniform(0.05, 0.12),
                    rng.uniform(70, 150)) for _ in range(rng.integers(1, 4))]
    frames = np.empty((tv.size, SIZE, SIZE, 3), np.uint8)
    visible, bright = vis(tv), pulse(tv)
    cx, cy, rad = xs(tv), ys(tv), rs(tv)
    for k, t in enumerate(tv):
        img = background.copy()
        for pos, vel, size, grey in distractors:
            px, py = (pos + vel * t) % 1.0
            img[(np.abs(xx - px) < size) & (np.abs(yy - py) < size * 0.6)] = grey
        if visible[k]:
            mask = _shape_mask(shape, xx - cx[k], yy - cy[k], rad[k])
            img[mask] = np.asarray(colour) * brightness(bright[k])
        frames[k] = img.clip(0, 255).astype(np.uint8)
    return frames, audio.astype(np.float32)


def _shape_mask(shape: str, dx, dy, r):
    import numpy as np
    ax, ay = np.abs(dx), np.abs(dy)
    d = np.hypot(dx, dy)
    if shape == "disc":
        return d < r
    if shape == "ring":
        return (d < r) & (d > 0.55 * r)
    if shape == "square":
        return (ax < 0.85 * r) & (ay < 0.85 * r)
    if shape == "frame":
        return (ax < r) & (ay < r) & ((ax > 0.6 * r) | (ay > 0.6 * r))
    if shape == "triangle":
        return (dy < 0.8 * r) & (dy > -r) & (ax < (dy + r) * 0.6)
    if shape == "cross":
        return ((ax < 0.3 * r) & (ay < r)) | ((ay < 0.3 * r) & (ax < r))
    if shape == "diamond":
        return ax + ay < r
    if shape == "hbar":
        return (ax < 1.3 * r) & (ay < 0.35 * r)
    if shape == "vbar":
        return (ay < 1.3 * r) & (ax < 0.35 * r)
    if shape == "dots":
        return (np.hypot(ax - 0.6 * r, dy) < 0.45 * r)
    raise ValueError(f"unknown shape {shape!r}")


def write_video(path, frames, audio) -> None:
    """Encode ``frames [T, S, S, 3]`` uint8 at FPS as MJPEG and ``audio [N]`` as 16 kHz PCM (.mkv)."""
    import av
    import numpy as np
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mjpeg", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuvj420p"
        vs.options = {"q:v": "3"}
        aus = out.add_stream("pcm_s16le", rate=SAMPLE_RATE)
        aus.layout = "mono"
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, FPS)
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        pcm = (np.clip(audio, -1, 1) * 32767).round().astype(np.int16)
        hop = SAMPLE_RATE // 10
        for i in range(0, pcm.size, hop):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + hop], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, i, Fraction(1, SAMPLE_RATE)
            out.mux(aus.encode(frame))
        out.mux(aus.encode())


def _make_one(args) -> None:
    path, cls, seed = args
    frames, audio = render_clip(cls, seed)
    write_video(path, frames, audio)


_VAL_OFFSET = 1_000_000   # render seeds of the val split start here (disjoint from train's)


def demo_plan(n_train: int = 400, n_val: int = 64, seed: int = 0,
              n_classes: int = len(CLASSES)) -> dict[str, list[tuple[str, int, int]]]:
    """``{"train": [...], "val": [...]}``: per clip ``(id, class index, render seed)``.

    Clip ``i`` of a split has id ``<split>_<i:05d>``, class ``i mod n_classes`` (balanced) and render
    seed ``seed * 10_000_019 + offset + i`` (offset 0 for train, 1,000,000 for val), so corpora of
    different ``seed`` share no clip, and a larger ``n_val`` only appends clips."""
    for name, v in (("n_train", n_train), ("n_val", n_val), ("seed", seed), ("n_classes", n_classes)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int, got {v!r}")
    for name, v in (("n_train", n_train), ("n_val", n_val)):
        if v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    if not 1 <= n_classes <= len(CLASSES):
        raise ValueError(f"n_classes must be in [1, {len(CLASSES)}] (the classes in "
                         f"tgdp.data.synthetic.CLASSES), got {n_classes!r}")
    return {split: [(f"{split}_{i:05d}", i % n_classes, seed * 10_000_019 + offset + i) for i in range(n)]
            for split, n, offset in (("train", n_train, 0), ("val", n_val, _VAL_OFFSET))}


def ensure_demo(out: str | os.PathLike | None = None, *, n_train: int = 400, n_val: int = 64,
                seed: int = 0, n_classes: int = len(CLASSES), workers: int | None = None,
                progress: bool = True, keep_videos: bool = False) -> Path:
    """Build the demo set under ``out`` (default ``DataConfig.demo_dir``) unless it is already there
    with the same settings; returns ``out``. Shards: ``out/train``, ``out/val``. ``seed`` and
    ``n_classes``: see :func:`demo_plan`."""
    plan = demo_plan(n_train, n_val, seed, n_classes)
    out = Path(out if out is not None else DataConfig().demo_dir).expanduser()
    stamp = {"gen_version": GEN_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed,
             "classes": [c[0] for c in CLASSES[:n_classes]], "seconds": SECONDS, "fps": FPS, "size": SIZE}
    stamp_path = out / "stamp.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp and all(
            (out / s / "manifest.json").is_file() and read_manifest(out / s).get("complete")
            for s in ("train", "val")):
        return out
    ours = ("train", "val", "videos", "train.csv", "val.csv")
    if not stamp_path.is_file() and any((out / p).exists() for p in ours):
        raise ValueError(f"{out} holds {[p for p in ours if (out / p).exists()]} but no stamp.json; "
                         "refusing to overwrite a folder the generator did not make")
    stamp_path.unlink(missing_ok=True)  # from here on the folder is being rebuilt
    for p in ours:
        if (out / p).is_dir():
            shutil.rmtree(out / p)
        else:
            (out / p).unlink(missing_ok=True)

    from tgdp.prepare import prepare
    jobs, lists = [], {}
    for split, clips in plan.items():
        (out / "videos" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for clip_id, cls, clip_seed in clips:
            path = out / "videos" / split / f"{clip_id}.mkv"
            jobs.append((str(path), cls, clip_seed))
            rows.append({"path": str(path), "id": clip_id, "labels": CLASSES[cls][0]})
        lists[split] = rows
    nproc = (os.cpu_count() or 1) if workers is None else workers
    # One pool for rendering and both prepare runs: every spawned worker pays the imports once.
    pool = multiprocessing.get_context("spawn").Pool(nproc) if nproc > 1 else None
    try:
        if pool is not None:
            pool.map(_make_one, jobs, chunksize=4)
        else:
            for job in jobs:
                _make_one(job)
        for split, rows in lists.items():
            with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=["path", "id", "labels"])
                w.writeheader()
                w.writerows(rows)
            prepare(out / f"{split}.csv", out / split, workers=nproc, shard_size=128,
                    progress=progress, pool=pool)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if not keep_videos:
        shutil.rmtree(out / "videos")
    atomic_write_json(stamp_path, stamp)
    return out


def _main(argv: list[str]) -> int:
    from tgdp.cli import UserError, parser, writing_to

    ap = parser("tgdp.data.synthetic", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    ap.add_argument("--out", default=DataConfig().demo_dir, help="output folder")
    ap.add_argument("--n", type=int, default=400, help="training clips")
    ap.add_argument("--n-val", type=int, default=64, help="held-out (retrieval) clips")
    ap.add_argument("--seed", type=int, default=0,
                    help="draws the corpus (same seed, same clips); 0 = the main job's demo set (default 0)")
    ap.add_argument("--classes", type=int, default=len(CLASSES),
                    help=f"number of classes, 1..{len(CLASSES)}: the first ones of CLASSES (default {len(CLASSES)})")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--keep-videos", action="store_true", help="keep the .mkv sources in <out>/videos")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args = ap.parse_args(argv)
    if args.n < 1 or args.n_val < 1:
        raise UserError(f"--n {args.n} and --n-val {args.n_val} must both be >= 1")
    try:
        with writing_to(args.out):
            out = ensure_demo(args.out, n_train=args.n, n_val=args.n_val, seed=args.seed, n_classes=args.classes,
                              workers=args.workers, keep_videos=args.keep_videos, progress=not args.no_progress)
    except ValueError as e:  # bad counts or class count, or a folder the generator did not make
        raise UserError(str(e)) from e
    print(f"demo set ready: {out}/train ({read_manifest(out / 'train')['num_samples']} clips), "
          f"{out}/val ({read_manifest(out / 'val')['num_samples']} clips)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.data.synthetic``: expected errors are one line and exit status 2."""
    from tgdp.cli import run

    return run("tgdp.data.synthetic", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
