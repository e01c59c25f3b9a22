"""PNG figures: t-SNE of audio/video globals, top-k retrieval examples, loss curves.

matplotlib is used through ``Figure`` + the Agg canvas directly (no pyplot, no global backend
switch), so plotting never needs a display and never changes the caller's matplotlib state. Every
figure is exactly ``size`` = (width, height) pixels (no tight bbox) and written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tgdp.atomic import atomic_write_bytes
from tgdp.eval.tsne import tsne

__all__ = ["plot_tsne", "plot_retrieval_examples", "plot_loss_curves", "read_log", "load_thumbnails"]


def _figure(size: tuple[int, int], dpi: int):
    from matplotlib.figure import Figure

    w, h = size
    if w < 64 or h < 64 or dpi < 10:
        raise ValueError(f"figure size {size} px must be >= 64x64 and dpi={dpi} >= 10")
    return Figure(figsize=(w / dpi, h / dpi), dpi=dpi)


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _as_2d(name: str, x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN/Inf")
    return x.float()


def plot_tsne(a, v, labels: Sequence, path: str | os.PathLike, perplexity: float = 30.0, iters: int = 1000,
              seed: int = 0, size: tuple[int, int] = (900, 700), dpi: int = 100, title: str = "") -> Path:
    """Joint t-SNE of audio (circles) and video (triangles) globals, coloured by class.

    a, v: [N, D] (one global per video and modality; L2-normalised here, the contrastive space);
    labels: N class names or ids. Perplexity is capped at (2N - 2) / 3 for small sets.
    """
    a, v = _as_2d("audio embeddings", a), _as_2d("video embeddings", v)
    if a.shape != v.shape:
        raise ValueError(f"audio {tuple(a.shape)} and video {tuple(v.shape)} embeddings must have the same shape")
    if len(labels) != a.shape[0]:
        raise ValueError(f"{len(labels)} labels for {a.shape[0]} videos")
    n = a.shape[0]
    x = torch.nn.functional.normalize(torch.cat([a, v]), dim=1)
    y = tsne(x, perplexity=min(perplexity, max(1.0, (2 * n - 2) / 3)), iters=iters, seed=seed).numpy()
    classes = sorted({str(c) for c in labels})
    cmap = _class_colours(len(classes))
    colour = {c: cmap[i] for i, c in enumerate(classes)}
    fig = _figure(size, dpi)
    ax = fig.add_subplot(1, 1, 1)
    cols = [colour[str(c)] for c in labels]
    ax.scatter(y[:n, 0], y[:n, 1], c=cols, marker="o", s=22, alpha=0.8, edgecolors="none")
    ax.scatter(y[n:, 0], y[n:, 1], c=cols, marker="^", s=26, alpha=0.8, edgecolors="none")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color="grey", label="audio"),
               Line2D([], [], marker="^", ls="", color="grey", label="video")]
    handles += [Line2D([], [], marker="s", ls="", color=colour[c], label=c) for c in classes[:20]]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of global embeddings ({n} videos, {len(classes)} classes)", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.78, top=0.93, bottom=0.03)
    return _save(fig, path, dpi)


def _class_colours(k: int) -> list:
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    return [colormaps["hsv"](i / k) for i in range(k)]


def _as_image(name: str, img) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or arr.size == 0:
        raise ValueError(f"{name} must be an [H, W] or [H, W, 3] image, got shape {arr.shape}")
    return arr


def plot_retrieval_examples(sim, query_images: Sequence, candidate_images: Sequence, queries: Sequence[int],
                            path: str | os.PathLike, k: int = 5, labels: Sequence[str] | None = None,
                            query_title: str = "query", size: tuple[int, int] | None = None,
                            dpi: int = 100) -> Path:
    """Grid: one row per query (its thumbnail), then its top-``k`` candidates by score.

    sim: [N, M] scores (rows = queries, e.g. :func:`tgdp.eval.retrieval.similarity_matrix`);
    query_images: N images, candidate_images: M images ([H, W] or [H, W, 3], uint8 or [0, 1]);
    queries: row indices to show. The true match (candidate index == query index) is framed green;
    a candidate with the query's label (if ``labels`` are given) is framed orange.
    """
    sim = torch.as_tensor(sim)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"sim must be a non-empty [N, M] matrix, got shape {tuple(sim.shape)}")
    n, m = sim.shape
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("sim contains NaN/Inf")
    if len(query_images) != n or len(candidate_images) != m:
        raise ValueError(f"{len(query_images)} query / {len(candidate_images)} candidate images for sim {n}x{m}")
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be in [1, {m}]")
    if len(queries) == 0 or any(not 0 <= int(q) < n for q in queries):
        raise ValueError(f"queries {list(queries)} must be a non-empty list of row indices in [0, {n})")
    if labels is not None and len(labels) != max(n, m):
        raise ValueError(f"{len(labels)} labels for {max(n, m)} items")
    rows, cols = len(queries), k + 1
    size = size or (160 * cols, 170 * rows)
    fig = _figure(size, dpi)
    top = torch.topk(sim[list(map(int, queries))].float(), k, dim=1).indices.tolist()
    for r, q in enumerate(map(int, queries)):
        cells = [(q, query_images[q], f"{query_title} {q}", None)]
        for rank, j in enumerate(top[r]):
            border = "green" if j == q else ("orange" if labels is not None and labels[j] == labels[q] else None)
            cells.append((j, candidate_images[j], f"#{rank + 1}: {j} ({float(sim[q, j]):.2f})", border))
        for c, (idx, img, text, border) in enumerate(cells):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            arr = _as_image(f"image {idx}", img)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            sub = f"\n{labels[idx]}"[:24] if labels is not None else ""
            ax.set_title(text + sub, fontsize=7)
            for spine in ax.spines.values():
                spine.set_visible(border is not None)
                if border is not None:
                    spine.set_edgecolor(border)
                    spine.set_linewidth(3)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.45)
    return _save(fig, path, dpi)


def read_log(path: str | os.PathLike) -> list[dict]:
    """Training log records: JSON lines (``.jsonl``, or any file of one JSON object per line), a JSON
    list (or ``{"history": [...]}`` / ``{"log": [...]}``), or CSV with a header.

    A ``.jsonl`` file is always read line by line, so a log of exactly one row is one record. A
    torn last line (a run killed mid-write) is left out.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"log file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    elif path.suffix == ".jsonl":
        rows = _json_lines(path, text)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            rows = _json_lines(path, text)
        else:
            if isinstance(obj, dict):
                inner = obj.get("history", obj.get("log"))
                rows = inner if inner is not None else [obj]   # a one-record log
            else:
                rows = obj
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"log file {path} holds no records (expected a list of dicts)")
    return rows


def _json_lines(path: Path, text: str) -> list:
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and rows:
                break   # the torn last line of a killed writer
            raise ValueError(f"log file {path} is neither JSON, JSON lines nor CSV: {exc}") from exc
    return rows


def _one_run(rows: list[dict], xkey: str | None) -> list[dict]:
    """The rows of the last run in the log (by ``run_id``), one per x value (the last one written),
    in increasing x: a log that holds two runs, or a resumed run's repeated steps, never makes a
    curve run backwards."""
    ids = [r.get("run_id") for r in rows]
    last = next((i for i in reversed(ids) if i is not None), None)
    if last is not None:
        rows = [r for r in rows if r.get("run_id") in (last, None)]
    if xkey is None:
        return rows
    by_x: dict = {}
    for r in rows:
        x = _num(r.get(xkey))
        if x is not None:
            by_x[x] = r
    return [by_x[x] for x in sorted(by_x)]


def _num(x) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_loss_curves(log, path: str | os.PathLike, keys: Sequence[str] | None = None,
                     size: tuple[int, int] = (900, 500), dpi: int = 100, title: str = "") -> Path:
    """Loss curves of a run. log: a log file (see :func:`read_log`) or a list of records.

    x axis: "step", else "epoch", else the record index. keys: the series to draw (default every
    numeric field whose name contains "loss"). Non-finite values are left out of a curve (shown as
    a gap), and a key with no numeric value raises ValueError. Only the last run of a log is drawn,
    one point per step, in step order (:func:`_one_run`).
    """
    rows = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    if not rows:
        raise ValueError("no log records to plot")
    xkey = next((k for k in ("step", "epoch") if all(k in r for r in rows)), None)
    rows = _one_run(rows, xkey)
    if keys is None:
        keys = sorted({k for r in rows for k in r if "loss" in k and _num(r[k]) is not None})
        if not keys:
            raise ValueError(f"no numeric loss field in the log; fields are {sorted({k for r in rows for k in r})}")
    fig = _figure(size, dpi)
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        pts = [(_num(r[xkey]) if xkey else i, _num(r.get(key))) for i, r in enumerate(rows)]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if not pts:
            raise ValueError(f"log field {key!r} has no numeric value")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=key, lw=1.2)
    ax.set_xlabel(xkey or "record")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "training losses", fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=0.1)
    return _save(fig, path, dpi)


def load_thumbnails(root: str | os.PathLike, ids: Sequence[str], frame: int = 8, size: int = 112) -> list[np.ndarray]:
    """Frame ``frame`` of each video in ``ids`` from a shard folder, as [size, size, 3] uint8.

    Reads ``manifest.json`` and each shard's ``<key>.json`` (for the id) and ``<key>.fNN.jpg``.
    Raises ValueError naming ids that are not found.
    """
    from PIL import Image

    root = Path(root)
    man = root / "manifest.json"
    if not man.is_file():
        raise ValueError(f"{root} has no manifest.json (not a shard folder)")
    shards = [root / s["path"] for s in json.loads(man.read_text())["shards"]]
    wanted = set(map(str, ids))
    found: dict[str, np.ndarray] = {}
    suffix = f".f{frame:02d}.jpg"
    for shard in shards:
        key_to_id: dict[str, str] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                name = member.name
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    key_to_id[name[:-5]] = str(meta.get("id"))
                elif name.endswith(suffix):
                    vid = key_to_id.get(name[: -len(suffix)])
                    if vid in wanted and vid not in found:
                        img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                        found[vid] = np.asarray(img.resize((size, size)))
        if len(found) == len(wanted):
            break
    missing = [i for i in map(str, ids) if i not in found]
    if missing:
        raise ValueError(f"{len(missing)} ids have no frame {frame} in {root}, e.g. {missing[:3]}")
    return [found[str(i)] for i in ids]
