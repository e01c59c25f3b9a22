"""``python -m tgdp.prepare``: raw videos → webdataset shards (format: docs/architecture.md).

    python -m tgdp.prepare --src DIR|list.csv|list.json --out DIR [--workers N] [--shard-size N]

Per clip (:func:`tgdp.data.clip_decode.decode_clip`, PyAV on the CPU): 16 frames sampled
uniformly over the first 10 s, resized + centre-cropped to 224, JPEG q=90 RGB; one audio channel
(``--channels first``, the official rule, or ``mix``) at 16 kHz, first 10.24 s, 16-bit FLAC; a
metadata JSON with a ``silent`` flag and the sha256 of every member (:mod:`tgdp.data.shards`).

Broken inputs are skipped, never replaced by placeholder data, and listed in the manifest's
``skipped`` list and in ``<out>/skipped.json`` as ``{"source", "id", "reason", "detail"}``
(reasons: :data:`tgdp.data.clip_decode.REASONS`). Kept clips that are silent on the chosen channel
but not on another are listed in ``flagged`` / ``<out>/flagged.json`` (reason ``silent_channel``).
A run that writes no clip at all raises :class:`tgdp.cli.UserError` (exit status 2).

Faults: ``--out`` is checked writable before any decoding. Workers are spawned processes run by
:class:`tgdp.data.workers.SurvivingMap`: a worker that dies (OOM killer, a crash in a decoder) is
noticed, its clip is retried once alone in a fresh worker and skipped as ``worker_died`` if that
one dies too; the run never waits on a dead process.

Inputs are ordered by the SHA-1 of their id (then id and path as tie-breaks) and cut into shards
of ``--shard-size`` inputs. The order depends only on the ids, so the same inputs always give the
same shards (whatever order the list has), yet it ignores any class grouping of the ids: lists are
often sorted by class, and the DALI loader reads a batch mostly from one shard, so id-ordered
shards would give one-class contrastive batches. The manifest is rewritten after every finished
shard, with the shard's sha256 and size; a second run with the same inputs and settings skips the
shards already listed there (resume) and redoes a listed shard whose file is missing or has
another size. A killed run rerun to completion gives byte-identical shards.

Sources: a folder (every file with a video suffix below it, id = relative path without suffix, no
labels), a CSV with a header (``path`` required; ``id``; ``labels`` separated by ``;``) or a JSON
list (or ``{"data": [...]}``) of objects with ``path``, optional ``id``/``video_id`` and
``labels`` (a list, or a comma-separated string as in the official dataset JSON). Relative paths
are resolved against the list file's folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import Executor
from pathlib import Path

from tgdp.atomic import atomic_write_json, check_writable
from tgdp.cli import UserError
from tgdp.data.clip_decode import CHANNELS, REASONS, ClipInput, ClipSkipped, decode_clip
from tgdp.data.shards import ShardWriter, new_manifest, read_manifest, sanitize_key, shard_name, write_manifest
from tgdp.data.workers import DIED, SurvivingMap

__all__ = ["ClipInput", "ClipSkipped", "REASONS", "VIDEO_SUFFIXES", "list_inputs", "shard_order_key",
           "decode_clip", "prepare", "main", "NothingPrepared"]


class NothingPrepared(UserError, ValueError):
    """Every input was skipped: the run wrote no clip (the message counts the reasons)."""

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg",
                            ".flv", ".ogv", ".3gp", ".wmv", ".ts"})


# ----------------------------------------------------------------------------- inputs

def list_inputs(src: str | os.PathLike) -> list[ClipInput]:
    """The clips of a folder, CSV or JSON list, in shard order (:func:`shard_order_key`)."""
    src = Path(src).expanduser()
    if src.is_dir():
        items = [ClipInput(str(p.resolve()), p.relative_to(src).with_suffix("").as_posix())
                 for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
    elif src.is_file() and src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"{src}: CSV needs a header with a 'path' column, got {reader.fieldnames}")
            items = [_item(src, row.get("path"), row.get("id"),
                           [s for s in (row.get("labels") or "").split(";")]) for row in reader]
    elif src.is_file() and src.suffix.lower() == ".json":
        data = json.loads(src.read_text(encoding="utf-8"))
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{src}: JSON must be a list (or {{'data': list}}) of objects")
        items = []
        for r in rows:
            labels = r.get("labels", [])
            if isinstance(labels, str):
                labels = labels.split(",")
            items.append(_item(src, r.get("path"), r.get("id", r.get("video_id")), labels))
    else:
        raise ValueError(f"--src {str(src)!r} must be a folder, a .csv or a .json list")
    return sorted(items, key=shard_order_key)


def shard_order_key(item: ClipInput) -> tuple[str, str, str]:
    """Sort key of the shard assignment: ``(sha1(id) hex, id, source)``.

    A hash of the id spreads ids that share a prefix (a class name, a class-sorted numbering) over
    all shards, deterministically; the id and source only break ties (equal ids: the duplicate
    check keeps the first source in this order).
    """
    return (hashlib.sha1(item.id.encode("utf-8")).hexdigest(), item.id, item.source)


def _item(listfile: Path, path, clip_id, labels) -> ClipInput:
    if not path:
        raise ValueError(f"{listfile}: an entry has no 'path'")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = listfile.parent / p
    labels = tuple(s.strip() for s in labels if isinstance(s, str) and s.strip())
    return ClipInput(str(p.resolve()), str(clip_id) if clip_id else p.stem, labels)


def _work(args):
    """Pool task: one clip → ``("ok", key, meta, flac, jpgs)`` or ``("skip", entry)``."""
    item, settings = args
    try:
        meta, flac, jpgs = decode_clip(item, **settings)
    except ClipSkipped as e:
        return ("skip", _skip(item, e.reason, e.detail))
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a long run; it is reported
        return ("skip", _skip(item, "error", f"{type(e).__name__}: {e}"))
    return ("ok", sanitize_key(item.id), meta, flac, jpgs)


def _skip(item: ClipInput, reason: str, detail: str) -> dict:
    return {"source": item.source, "id": item.id, "reason": reason, "detail": detail}


# ----------------------------------------------------------------------------- the run

def prepare(src: str | os.PathLike, out: str | os.PathLike, *, workers: int | None = None,
            shard_size: int = 256, img_size: int = 224, num_frames: int = 16,
            sample_rate: int = 16000, channels: str = "first", progress: bool = True, pool=None) -> dict:
    """Prepare every clip of ``src`` into shards under ``out``; returns the final manifest.

    ``workers``: processes (spawn); ``None`` = all CPUs, 0 or 1 = in this process. ``pool``: an open
    ``concurrent.futures.ProcessPoolExecutor`` to use first (the caller shuts it down); a
    ``multiprocessing.Pool`` is not used (it cannot report a dead worker and would wait forever).
    ``channels``: "first" or "mix" (:mod:`tgdp.data.clip_decode`).
    Resumes a previous run into the same ``out`` (same inputs and settings); raises ValueError
    if ``out`` holds a manifest made from other inputs or settings, and :class:`NothingPrepared`
    (after writing the manifest and skip report) if no clip could be used.
    """
    for name, v in (("shard_size", shard_size), ("img_size", img_size), ("num_frames", num_frames),
                    ("sample_rate", sample_rate)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a non-negative int or None, got {workers!r}")
    if channels not in CHANNELS:
        raise ValueError(f"channels={channels!r} must be one of {list(CHANNELS)}")
    out = check_writable(Path(out).expanduser())      # before any decoding
    items = list_inputs(src)
    if not items:
        raise ValueError(f"--src {str(src)!r} lists no videos (suffixes: {sorted(VIDEO_SUFFIXES)})")
    items, dup_skips = _dedupe(items)
    settings = {"img_size": img_size, "num_frames": num_frames, "sample_rate": sample_rate}
    if channels != "first":   # "first" keeps the fingerprint of folders made before the option
        settings["channels"] = channels
    fingerprint = _fingerprint(items, settings, shard_size)

    for stale in out.glob("*.tmp"):   # left by a killed run; never listed in the manifest
        stale.unlink()
    if (out / "manifest.json").exists():
        manifest = read_manifest(out)
        if manifest.get("fingerprint") != fingerprint:
            raise ValueError(f"{out} holds shards of other inputs or settings (fingerprint "
                             f"{manifest.get('fingerprint')} != {fingerprint}); use another --out")
        _drop_damaged(out, manifest)
    else:
        manifest = new_manifest(frames_per_clip=num_frames, sample_rate=sample_rate,
                                img_size=img_size, shard_size=shard_size, fingerprint=fingerprint,
                                empty_shards=[], complete=False)
    manifest.update(channels=channels, member_checksums="sha256")
    manifest.setdefault("flagged", [])
    manifest["skipped"] = dup_skips + [s for s in manifest["skipped"] if s["reason"] != "duplicate_id"]
    done = {s["index"] for s in manifest["shards"]} | set(manifest["empty_shards"])
    n_shards = -(-len(items) // shard_size)
    todo = [s for s in range(n_shards) if s not in done]
    tasks = [(item, dict(settings, channels=channels))
             for s in todo for item in items[s * shard_size:(s + 1) * shard_size]]

    from tqdm import tqdm
    bar = tqdm(total=len(tasks), unit="clip", desc=f"prepare {out.name}", disable=not progress, file=sys.stderr)
    nproc = (os.cpu_count() or 1) if workers is None else workers
    runner = None
    if nproc > 1 and len(tasks) > 1:
        runner = SurvivingMap(_work, nproc, executor=pool if isinstance(pool, Executor) else None)
        results = runner(tasks)
    else:
        results = map(_work, tasks)
    try:
        for s in todo:
            chunk = items[s * shard_size:(s + 1) * shard_size]
            _write_shard(out, s, num_frames, (_died_to_skip(next(results), item) for item in chunk), manifest, bar)
            write_manifest(out, manifest)
        manifest["complete"] = True
        write_manifest(out, manifest)
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()   # a SurvivingMap generator: shuts its pools down
    atomic_write_json(out / "skipped.json", manifest["skipped"])
    atomic_write_json(out / "flagged.json", manifest["flagged"])
    final = read_manifest(out)
    if final["num_samples"] == 0:
        reasons = Counter(s["reason"] for s in final["skipped"])
        raise NothingPrepared(f"no clip could be used: all {len(items) + len(dup_skips)} inputs of {src} were "
                              f"skipped ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())}); see "
                              f"{out / 'skipped.json'} and fix or replace the inputs")
    return final


def _died_to_skip(res, item: ClipInput):
    if res is DIED:
        return ("skip", _skip(item, "worker_died", "the worker process decoding it died twice (killed, e.g. by "
                                                   "the OOM killer, or crashed); retried once alone"))
    return res


def _drop_damaged(out: Path, manifest: dict) -> None:
    """Forget listed shards whose tar is missing or has another size than recorded (redone below)."""
    keep = []
    for e in manifest["shards"]:
        p = out / e["path"]
        size = p.stat().st_size if p.is_file() else -1
        if size < 0 or ("bytes" in e and size != e["bytes"]):
            manifest["skipped"] = [s for s in manifest["skipped"] if s.get("shard") != e["index"]]
            manifest["flagged"] = [f for f in manifest.get("flagged", []) if f.get("shard") != e["index"]]
        else:
            keep.append(e)
    manifest["shards"] = keep


def _write_shard(out: Path, s: int, num_frames: int, results, manifest: dict, bar) -> None:
    """Write shard ``s`` from its clips' results and record it (and its skips, flags) in ``manifest``."""
    skips, flags = [], []
    with ShardWriter(out / f"{shard_name(s)}.tar", num_frames=num_frames) as writer:
        for res in results:
            if res[0] == "ok":
                writer.write(*res[1:])
                meta = res[2]
                if meta.get("silent_channel"):
                    flags.append({"source": meta.get("source"), "id": meta.get("id"), "reason": "silent_channel",
                                  "detail": f"silent on the chosen channel ({meta.get('channels')}) but channel "
                                            f"peaks are {meta.get('channel_peaks')}", "shard": s})
            else:
                skips.append(dict(res[1], shard=s))
            bar.update(1)
        count = writer.close()
    if count:
        tar = out / f"{shard_name(s)}.tar"
        manifest["shards"].append({"path": tar.name, "count": count, "index": s, "sha256": writer.sha256,
                                   "bytes": tar.stat().st_size})
        manifest["shards"].sort(key=lambda e: e["index"])
    else:
        manifest["empty_shards"] = sorted(manifest["empty_shards"] + [s])
    manifest["skipped"].extend(skips)
    manifest["flagged"].extend(flags)


def _dedupe(items: list[ClipInput]) -> tuple[list[ClipInput], list[dict]]:
    kept, skips, seen = [], [], {}
    for item in items:
        key = sanitize_key(item.id)
        if key in seen:
            skips.append(_skip(item, "duplicate_id", f"id {item.id!r} already used by {seen[key]}"))
        else:
            seen[key] = item.source
            kept.append(item)
    return kept, skips


def _fingerprint(items: list[ClipInput], settings: dict, shard_size: int) -> str:
    # The items are hashed in shard order, so the fingerprint also pins the shard assignment: an
    # output folder cut under another order (e.g. the former id order) is refused, not mixed.
    h = hashlib.sha1(json.dumps([settings, shard_size]).encode())
    for it in items:
        h.update(json.dumps([it.source, it.id, it.labels]).encode())
    return h.hexdigest()[:16]


def _main(argv: list[str]) -> int:
    from tgdp.cli import UserError, parser, writing_to

    ap = parser("tgdp.prepare", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    ap.add_argument("--src", required=True, help="folder of videos, or a .csv/.json list of them")
    ap.add_argument("--out", required=True, help="output folder (manifest.json + shards)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--shard-size", type=int, default=256, help="inputs per shard")
    ap.add_argument("--img-size", type=int, default=224, help="stored frame size in pixels")
    ap.add_argument("--channels", choices=CHANNELS, default="first",
                    help="audio channel kept: first (official) or mix (mean of all channels)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args = ap.parse_args(argv)
    for flag, value, least in (("--shard-size", args.shard_size, 1), ("--img-size", args.img_size, 1),
                               ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value} must be >= {least}")
    try:
        with writing_to(args.out):
            manifest = prepare(args.src, args.out, workers=args.workers, shard_size=args.shard_size,
                               img_size=args.img_size, channels=args.channels,
                               progress=not args.no_progress)
    except ValueError as e:  # bad arguments, an unreadable list, a folder of other shards
        msg = str(e)
        raise UserError(msg if str(args.src) in msg or str(args.out) in msg else f"--src {args.src}: {msg}") from e
    reasons: dict[str, int] = {}
    for s in manifest["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    print(f"{manifest['num_samples']} clips in {len(manifest['shards'])} shards under {args.out}; "
          f"skipped {len(manifest['skipped'])} {reasons or ''} (see skipped.json); "
          f"flagged {len(manifest['flagged'])} (see flagged.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.prepare``: expected errors are one line and exit status 2."""
    from tgdp.cli import run

    return run("tgdp.prepare", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
