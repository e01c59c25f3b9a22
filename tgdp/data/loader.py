"""Plain-PyTorch data path over the webdataset shards (reference and fallback for DALI).

Shard format: ``docs/architecture.md`` ("Data: shard format"). Per sample: JSON metadata, a 16 kHz
FLAC, 16 JPEG frames. The audio goes FLAC -> soundfile -> :func:`tgdp.data.fbank.fbank` ->
:func:`tgdp.data.windows.audio_windows`; the frame goes JPEG -> PIL ``.convert('RGB')`` -> bicubic
resize (short side) -> centre crop -> ImageNet normalisation.

Modes: ``train`` = one frame per clip per epoch, drawn from a generator seeded by
``(seed, epoch, sample id)`` — so the draw does not depend on worker count, shuffling or rank;
``eval`` = the fixed ``data.eval_frame``; ``retrieval`` = all frames (video-major rows).
Corrupt samples (missing member, undecodable JSON/JPEG/FLAC, a member whose sha256 differs from
the one in its metadata, wrong sample rate, audio shorter than one fbank frame) are skipped and
counted by reason (:data:`SKIP_REASONS`), never replaced. Only the members a sample actually uses
are checked (its JSON, FLAC and the frames it decodes), on the bytes already read from the tar.
Shards made before tgdp.prepare recorded checksums load unchecked, with a note (``notes``).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from tgdp.data.batch import (IMAGENET_MEAN, IMAGENET_STD, MODES, SKIP_REASONS, Batch, sample_generator,
                             valid_time_columns)
from tgdp.data.fbank import fbank, frame_geometry
from tgdp.data.shards import check_members, read_manifest, shard_notes
from tgdp.data.windows import audio_windows, window_starts

__all__ = ["Batch", "ShardDataset", "TorchLoader", "make_loader", "decode_image",
           "decode_audio", "sample_generator", "valid_time_columns", "IMAGENET_MEAN", "IMAGENET_STD", "MODES", "CorruptSample",
           "SKIP_REASONS", "shard_notes"]


class CorruptSample(Exception):
    """A sample that cannot be used; ``reason`` is the skip-counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """JPEG bytes -> ``[3, size, size]`` float32, ImageNet-normalised (grayscale/CMYK -> RGB)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")  # also forces the full decode, so truncation raises here
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise CorruptSample("bad image", str(exc)) from None
    w, h = im.size
    if min(w, h) != size:  # torchvision Resize(int) semantics: short side -> size, keep aspect
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.resize((nw, nh), Image.BICUBIC)
        w, h = nw, nh
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def decode_audio(data: bytes, sample_rate: int) -> torch.Tensor:
    """FLAC bytes -> ``[N]`` float32 in [-1, 1) (int16 / 32768, channel 0)."""
    import soundfile as sf

    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise CorruptSample("bad audio", str(exc)) from None
    if sr != sample_rate:
        raise CorruptSample("wrong sample rate", f"{sr} Hz, expected {sample_rate}")
    if wave.shape[0] < frame_geometry(sample_rate).length:
        raise CorruptSample("short audio", f"{wave.shape[0]} samples")
    return torch.from_numpy(np.ascontiguousarray(wave[:, 0]))


def _iter_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample; members of one sample are consecutive (key = name up to the first dot)."""
    key, parts = None, {}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name.rsplit("/", 1)[-1]
            if name.startswith(".") or "." not in name:
                continue
            k, ext = name.split(".", 1)
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            fh = tar.extractfile(m)
            parts[ext] = fh.read() if fh is not None else b""
    if key is not None:
        yield key, parts


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples from the shards of one rank, split again across DataLoader workers.

    With at least ``world_size * num_workers`` shards each worker reads whole shards; otherwise
    every worker reads all shards and keeps every n-th sample, so each sample is read exactly once
    per epoch across ranks and workers. ``skipped`` counts corrupt samples of this process.

    Yields dicts: ``audio [R, T, M]``, ``frames [R, 3, S, S]``, ``frame_idx [R]``, ``labels``, ``id``
    with R = 1 (train/eval) or ``frames_per_clip`` (retrieval).
    """

    def __init__(self, root: str | Path, mode: str = "train", *, data=None, img_size: int = 224,
                 audio_length: int = 416, rank: int = 0, world_size: int = 1, seed: int = 0,
                 frame: int | None = None, shuffle: bool | None = None, patch_size: int = 16):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if data is None:
            from tgdp.configs import DataConfig
            data = DataConfig()
        if frame is not None and not 0 <= frame < data.frames_per_clip:
            raise ValueError(f"frame={frame} must be in [0, {data.frames_per_clip})")
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        self.checksums, self.notes = shard_notes(self.root, self.manifest, data)
        self.mode, self.data, self.img_size, self.audio_length = mode, data, img_size, audio_length
        self.patch_size = patch_size  # audio patch rows, for the valid time columns of each window
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.frame = frame  # forces one frame index in train/eval (tests, DALI parity)
        self.shuffle = (mode == "train") if shuffle is None else shuffle
        self.skipped: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> tuple[list[Path], int, int]:
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        total, me = self.world_size * nw, self.rank * nw + wid
        shards = [self.root / s["path"] for s in self.manifest["shards"]]
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(shards)
        if len(shards) >= total:
            return shards[me::total], 1, 0
        return shards, total, me

    def _samples(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        shards, stride, offset = self._my_shards()
        i = 0
        for path in shards:
            try:
                for key, parts in _iter_tar(path):
                    if i % stride == offset:
                        yield key, parts
                    i += 1
            except (tarfile.TarError, EOFError, OSError):
                # A truncated/unreadable tar: the samples read so far were used; the rest of this
                # shard is lost and counted once (sample-level splits may count it in every worker).
                self.skipped["bad shard"] += 1

    def _load(self, key: str, parts: dict[str, bytes]) -> dict:
        d = self.data
        k = d.frames_per_clip
        names = ["json", "flac"] + [f"f{i:02d}.jpg" for i in range(k)]
        missing = [n for n in names if not parts.get(n)]
        if missing:
            raise CorruptSample("missing member", ",".join(missing))
        try:
            meta = json.loads(parts["json"])
            times = [float(t) for t in meta["frame_times"]]
            labels = [str(x) for x in meta.get("labels", [])]
            sid = str(meta.get("id", key))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptSample("bad metadata", str(exc)) from None
        if len(times) != k:
            raise CorruptSample("bad metadata", f"{len(times)} frame_times, expected {k}")
        if self.mode == "retrieval":
            idx = list(range(k))
        elif self.frame is not None:
            idx = [self.frame]
        elif self.mode == "eval":
            idx = [d.eval_frame]
        else:
            idx = [int(torch.randint(k, (1,), generator=sample_generator(self.seed, self.epoch, sid)))]
        used = {"flac": parts["flac"], **{f"f{i:02d}.jpg": parts[f"f{i:02d}.jpg"] for i in idx}}
        ok = check_members(meta, used)
        if ok is False or (ok is None and self.checksums):
            raise CorruptSample("checksum", f"{key}: a member differs from the sha256 in its metadata")
        frames = torch.stack([decode_image(parts[f"f{i:02d}.jpg"], self.img_size) for i in idx])
        wave = decode_audio(parts["flac"], d.sample_rate)
        fb = fbank(wave.unsqueeze(0), d.sample_rate, check_finite=False)  # soundfile never yields NaN
        shifts = None
        if self.mode == "train" and d.time_shift > 0:
            m = int(d.time_shift * self.audio_length)
            shifts = torch.randint(-m, m + 1, (1,), generator=sample_generator(self.seed, self.epoch, sid, "shift"))
        fidx = torch.tensor(idx, dtype=torch.long)
        ftime = torch.tensor([times[i] for i in idx], dtype=torch.float64)
        audio = audio_windows(fb.expand(len(idx), -1, -1), fidx, ftime, data=d,
                              length=self.audio_length, shifts=shifts)
        starts = window_starts(fidx, ftime, mode=d.window, total=d.fbank_frames, length=self.audio_length,
                               frames_per_clip=d.frames_per_clip)   # the rows audio_windows cut
        real = torch.full((len(idx),), min(fb.shape[1], d.fbank_frames), dtype=torch.long)
        valid = valid_time_columns(real, starts, self.audio_length, self.patch_size,
                                   None if shifts is None else shifts.expand(len(idx)))
        return {"audio": audio, "frames": frames, "frame_idx": fidx, "labels": labels, "id": sid,
                "audio_valid": valid}

    def __iter__(self) -> Iterator[dict]:
        buf: list[tuple[str, dict[str, bytes]]] = []
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{info.id if info else 0}")
        size = self.data.shuffle_buffer if self.shuffle else 0
        for item in self._samples():
            if size <= 1:
                out = item
            else:
                buf.append(item)
                if len(buf) < size:
                    continue
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                out = buf.pop()
            yield from self._load_or_skip(*out)
        rng.shuffle(buf)
        for item in buf:
            yield from self._load_or_skip(*item)

    def _load_or_skip(self, key, parts) -> Iterator[dict]:
        try:
            yield self._load(key, parts)
        except CorruptSample as exc:
            self.skipped[exc.reason] += 1


def collate(items: list[dict], skipped: dict[str, int] | None = None) -> Batch:
    """Per-sample dicts (``R`` rows each) -> :class:`Batch` with ``sum(R)`` rows, video-major."""
    if not items:
        return Batch(torch.empty(0), torch.empty(0), [], [], torch.empty(0, dtype=torch.long), dict(skipped or {}))
    valid = [it.get("audio_valid") for it in items]
    return Batch(torch.cat([it["audio"] for it in items]), torch.cat([it["frames"] for it in items]),
                 [it["labels"] for it in items], [it["id"] for it in items],
                 torch.cat([it["frame_idx"] for it in items]), dict(skipped or {}),
                 None if any(v is None for v in valid) else torch.cat(valid))


class _Batched(torch.utils.data.IterableDataset):
    """Batches inside the worker, so each Batch can carry the worker's skip counts to the main process."""

    def __init__(self, ds: ShardDataset, batch_size: int, drop_last: bool):
        self.ds, self.batch_size, self.drop_last = ds, batch_size, drop_last

    def __iter__(self) -> Iterator[Batch]:
        items, reported = [], Counter(self.ds.skipped)  # in-process datasets keep counting across epochs
        for it in self.ds:
            items.append(it)
            if len(items) == self.batch_size:
                yield collate(items, self.ds.skipped - reported)
                reported, items = Counter(self.ds.skipped), []
        rest = self.ds.skipped - reported
        if items and not self.drop_last:
            yield collate(items, rest)
        elif rest:
            yield collate([], rest)  # empty batch: only reports the last skips


class TorchLoader:
    """Iterable of :class:`Batch` (moved to ``device``); ``skipped`` sums corrupt samples seen so far."""

    backend = "torch"

    def __init__(self, ds: ShardDataset, batch_size: int, *, num_workers: int = 0, drop_last: bool = False,
                 device=None):
        self.dataset, self.device = ds, device
        self.root, self.manifest, self.notes = ds.root, ds.manifest, ds.notes
        self.skipped: Counter = Counter()
        pin = device is not None and torch.device(device).type == "cuda"
        self._loader = torch.utils.data.DataLoader(_Batched(ds, batch_size, drop_last), batch_size=None,
                                                   num_workers=num_workers, pin_memory=pin)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        for b in self._loader:
            self.skipped.update(b.skipped)
            if len(b) == 0:
                continue
            yield b.to(self.device, non_blocking=True) if self.device is not None else b


def make_loader(cfg, mode: str = "train", rank: int = 0, world_size: int = 1, *, batch_size: int | None = None,
                root: str | None = None, device=None, num_workers: int | None = None, seed: int | None = None,
                frame: int | None = None, shuffle: bool | None = None, drop_last: bool | None = None):
    """The data loader for one rank: DALI (``data.loader`` "dali", or "auto" with DALI and CUDA) or torch.

    Args:
        cfg: a :class:`tgdp.configs.Config`; ``data``, ``model.img_size``/``audio_length``, ``train.seed``.
        mode: "train" | "eval" | "retrieval".
        root: shard folder (manifest.json); default ``data.root``, else the demo set's
            ``<data.demo_dir>/train`` (train) or ``/val`` (eval, retrieval).
        batch_size: default ``train.batch_size // world_size`` (train/eval) or ``eval.batch_videos``
            (retrieval: videos per batch, ``16x`` rows).
        frame: force one frame index (train/eval), e.g. to compare loaders.
        shuffle, drop_last: default True in train, False otherwise.

    Returns an iterable of :class:`Batch` with ``set_epoch(epoch)``, ``skipped`` (a Counter) and ``backend``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
    d = cfg.data
    if not root:
        root = d.root or str(Path(d.demo_dir).expanduser() / ("train" if mode == "train" else "val"))
    if batch_size is None:
        batch_size = cfg.eval.batch_videos if mode == "retrieval" else max(1, cfg.train.batch_size // world_size)
    seed = cfg.train.seed if seed is None else seed
    shuffle = (mode == "train") if shuffle is None else shuffle
    drop_last = (mode == "train") if drop_last is None else drop_last
    workers = d.num_workers if num_workers is None else num_workers
    backend = d.loader
    if backend == "auto":
        from tgdp.data.dali import dali_available
        backend = "dali" if dali_available() and torch.cuda.is_available() else "torch"
    if backend == "dali":
        from tgdp.data.dali import DaliLoader
        loader = DaliLoader(root, mode, data=d, img_size=cfg.model.img_size, audio_length=cfg.model.audio_length,
                            batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                            num_threads=d.dali_threads or None, device=device, frame=frame, shuffle=shuffle,
                            drop_last=drop_last, patch_size=cfg.model.patch_size)
    else:
        ds = ShardDataset(root, mode, data=d, img_size=cfg.model.img_size, audio_length=cfg.model.audio_length,
                          rank=rank, world_size=world_size, seed=seed, frame=frame, shuffle=shuffle,
                          patch_size=cfg.model.patch_size)
        loader = TorchLoader(ds, batch_size, num_workers=workers, drop_last=drop_last, device=device)
    if rank == 0:
        for note in loader.notes:
            print(f"[tgdp.data] note: {note}", flush=True)
    return loader
