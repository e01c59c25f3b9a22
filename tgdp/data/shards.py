"""Webdataset shards of prepared clips: writer, reader, DALI index and the manifest.

The format is documented in ``docs/architecture.md`` ("Data: shard format"). A sample is
``<key>.json`` (metadata), ``<key>.flac`` (mono 16 kHz, 16-bit), then ``<key>.f00.jpg`` …
``<key>.f15.jpg`` (RGB frames), in that order, all with the same key. Next to each
``shard-NNNNNN.tar`` sits ``shard-NNNNNN.idx`` in DALI's ``wds2idx`` text format (``v1.2``), so
``fn.readers.webdataset(index_paths=...)`` needs no scan of the tar.

Every file is written to a temporary (``<tar>.tmp`` while a shard streams; :mod:`tgdp.atomic` for the
index and the manifest) and renamed into place only when complete, so a crash never leaves a
half-written shard, index or manifest under its final name.

Checksums: :meth:`ShardWriter.write` stores the sha256 of every member in the sample's metadata
(``"checksums": {"json": …, "flac": …, "f00.jpg": …}``; the JSON's own entry hashes its canonical
form without the ``checksums`` key, :func:`meta_digest`), and :meth:`ShardWriter.close` the sha256
of the whole tar, which ``tgdp.prepare`` records per shard in the manifest (``"sha256"``) with
``"member_checksums": "sha256"``. Both loaders check the members they read
(:func:`check_members`); shards made before checksums existed load unchecked, with a note.

Only the standard library is used here: the torch loader, the DALI pipeline and ``tgdp.prepare``
all import this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from tgdp.atomic import atomic_write_bytes, atomic_write_json
from tgdp.cli import UserError

__all__ = [
    "MANIFEST_NAME", "MANIFEST_VERSION", "ShardWriter", "ShardError", "iter_shard", "read_index", "shard_name",
    "sanitize_key", "frame_ext", "member_exts", "new_manifest", "read_manifest", "write_manifest",
    "meta_digest", "check_members", "file_sha256", "manifest_channels", "shard_notes", "index_is_current",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# wds2idx writes "v1.2 <num_samples>" then one line per sample: "<ext> <offset> <size> <name>" per member.
_INDEX_VERSION = "v1.2"
_BLOCK = 512  # tar block size: every member is one 512-byte USTAR header + data padded to 512
_KEY_MAX = 64  # keeps "<key>.f15.jpg" under the 100-character USTAR name limit
_MANIFEST_KEYS = ("version", "shards", "num_samples", "frames_per_clip", "sample_rate", "img_size",
                  "skipped")


class ShardError(UserError, ValueError):
    """A shard folder or manifest is missing or unusable; the message names the path and what to do."""


# ----------------------------------------------------------------------------- checksums

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def meta_digest(meta: dict) -> str:
    """sha256 of a sample's metadata in canonical JSON form, without its ``checksums`` entry."""
    body = {k: v for k, v in meta.items() if k != "checksums"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def check_members(meta: dict, parts: dict[str, bytes]) -> bool | None:
    """Check the metadata and the members in ``parts`` (``{ext: bytes}``) against ``meta["checksums"]``.

    True: all match; False: one does not (or is not listed); None: the sample has no checksums
    (made before tgdp.prepare recorded them).
    """
    sums = meta.get("checksums")
    if sums is None:
        return None
    if not isinstance(sums, dict) or sums.get("json") != meta_digest(meta):
        return False
    return all(sums.get(ext) == _sha256(data) for ext, data in parts.items())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_channels(manifest: dict) -> str:
    """The audio channel rule the shards were prepared with (shards from before the option: "first")."""
    return str(manifest.get("channels", "first"))


def shard_notes(root, manifest: dict, data) -> tuple[bool, list[str]]:
    """``(checksums expected?, notes)`` for a shard folder, for both loaders; :class:`ShardError` if it
    was prepared with another audio channel rule than ``data.channels``."""
    ch = manifest_channels(manifest)
    want = getattr(data, "channels", "first")
    if ch != want:
        raise ShardError(f"data.channels={want!r} but {root} was prepared with channels={ch!r}; pass "
                         f"--data.channels {ch} or re-run python -m tgdp.prepare --channels {want}")
    if manifest.get("member_checksums") == "sha256":
        return True, []
    return False, [f"the shards in {root} carry no checksums (made by an older tgdp.prepare): a corrupt member "
                   "is found only if it fails to decode; re-run python -m tgdp.prepare to add them"]


def shard_name(index: int) -> str:
    """``shard-000042`` (no extension) for shard ``index``."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    return f"shard-{index:06d}"


def frame_ext(i: int) -> str:
    """Member extension of frame ``i``: ``f00.jpg`` … ``f15.jpg``."""
    return f"f{i:02d}.jpg"


def member_exts(num_frames: int = 16) -> list[str]:
    """Extensions of one sample's members in tar order: ``json, flac, f00.jpg, …``."""
    return ["json", "flac"] + [frame_ext(i) for i in range(num_frames)]


def sanitize_key(clip_id: str) -> str:
    """Tar key of a clip id: only ``[A-Za-z0-9_-]`` and at most 64 characters.

    Webdataset splits a member name at the *first* dot into key and extension, so an id with a dot,
    slash or space cannot be used as is. Such ids (and over-long ones) get a hash suffix of the
    original id, so two ids that sanitise to the same text still get different keys.
    """
    if not isinstance(clip_id, str) or not clip_id:
        raise ValueError(f"clip id must be a non-empty str, got {clip_id!r}")
    key = re.sub(r"[^A-Za-z0-9_-]", "_", clip_id)
    if key != clip_id or len(key) > _KEY_MAX:
        digest = hashlib.sha1(clip_id.encode("utf-8")).hexdigest()[:12]
        key = f"{key[:_KEY_MAX - 13]}-{digest}"
    return key


# ----------------------------------------------------------------------------- writer

class ShardWriter:
    """Write one shard ``<dir>/shard-NNNNNN.tar`` and its DALI index ``.idx``.

    ``write`` appends one sample to ``<tar>.tmp``; ``close`` writes the index and renames both into
    place and returns the sample count. A shard with no samples leaves no file (an empty tar is not
    a valid webdataset). Used as a context manager, an exception aborts the shard (tmp removed).
    """

    def __init__(self, path: str | os.PathLike, num_frames: int = 16):
        self.path = Path(path)
        if self.path.suffix != ".tar":
            raise ValueError(f"shard path must end in .tar, got {str(self.path)!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        self.num_frames = num_frames
        self.index_path = self.path.with_suffix(".idx")
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        # USTAR: fixed 512-byte headers (no pax/GNU extension blocks), so data offsets are predictable.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._lines: list[str] = []
        self._keys: set[str] = set()
        self.count = 0
        self.sha256: str | None = None   # of the finished tar (set by close)

    def write(self, key: str, meta: dict, flac: bytes, jpgs: list[bytes]) -> None:
        """Append one sample. ``jpgs``: ``num_frames`` JPEG byte strings, frame order."""
        if self._tar is None:
            raise ValueError(f"shard {self.path} is already closed")
        if sanitize_key(key) != key:
            raise ValueError(f"key {key!r} is not sanitised (use sanitize_key)")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.path}")
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        if not isinstance(flac, (bytes, bytearray)) or not flac:
            raise ValueError(f"flac for {key!r} must be non-empty bytes")
        if len(jpgs) != self.num_frames or not all(isinstance(j, (bytes, bytearray)) and j for j in jpgs):
            raise ValueError(f"{key!r}: expected {self.num_frames} non-empty JPEG byte strings, "
                             f"got {len(jpgs)}")
        exts = member_exts(self.num_frames)
        meta = {k: v for k, v in meta.items() if k != "checksums"}
        data = [bytes(flac)] + [bytes(j) for j in jpgs]
        meta["checksums"] = {"json": meta_digest(meta), **{e: _sha256(d) for e, d in zip(exts[1:], data)}}
        payloads = [json.dumps(meta).encode("utf-8")] + data
        fields = []
        for ext, payload in zip(exts, payloads):
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            info.mtime = 0  # deterministic bytes: the same inputs give the same shard
            header_at = self._tar.offset
            self._tar.addfile(info, io.BytesIO(payload))
            padded = -(-len(payload) // _BLOCK) * _BLOCK
            # Internal invariant: one header block, so the data starts 512 bytes after the header.
            assert self._tar.offset == header_at + _BLOCK + padded, "unexpected tar header size"
            fields.append(f"{ext} {header_at + _BLOCK} {len(payload)} {name}")
        self._lines.append(" ".join(fields))
        self._keys.add(key)
        self.count += 1

    def close(self) -> int:
        """Finish the tar, write the index, rename both into place; returns the sample count.

        Sets :attr:`sha256` (of the tar's bytes, read back from the disk)."""
        if self._tar is None:
            return self.count
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = None
        if self.count == 0:
            self._tmp.unlink()
            return 0
        self.sha256 = file_sha256(self._tmp)
        index = f"{_INDEX_VERSION} {self.count}\n" + "\n".join(self._lines) + "\n"
        atomic_write_bytes(self.index_path, index.encode("utf-8"))
        os.replace(self._tmp, self.path)
        return self.count

    def abort(self) -> None:
        """Drop the partial shard (nothing is left under the final names)."""
        if self._tar is not None:
            self._tar = None
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- readers

def iter_shard(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the samples of one shard in order.

    Each item: ``{"key": str, "meta": dict, "flac": bytes, "jpgs": [bytes] * num_frames}``.
    Raises ValueError when a sample's members are missing, out of order or of unknown extension.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard {str(path)!r} does not exist")
    with tarfile.open(path, mode="r:") as tar:
        key, parts = None, []
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            dot = name.find(".", name.rfind("/") + 1)
            if dot <= 0:
                raise ValueError(f"{path}: member {name!r} has no key.extension form")
            k, ext = name[:dot], name[dot + 1:]
            if k != key:
                if key is not None:
                    yield _assemble(path, key, parts)
                key, parts = k, []
            parts.append((ext, tar.extractfile(member).read()))
        if key is not None:
            yield _assemble(path, key, parts)


def _assemble(path: Path, key: str, parts: list[tuple[str, bytes]]) -> dict:
    exts = [e for e, _ in parts]
    if exts[:2] != ["json", "flac"]:
        raise ValueError(f"{path}: sample {key!r} must start with json, flac; got {exts}")
    meta = json.loads(parts[0][1])
    n = meta.get("num_frames")
    if not isinstance(n, int) or exts != member_exts(n):
        raise ValueError(f"{path}: sample {key!r} has members {exts}, expected {member_exts(n or 16)}")
    return {"key": key, "meta": meta, "flac": parts[1][1], "jpgs": [d for _, d in parts[2:]]}


def read_index(path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a ``wds2idx`` v1.2 index: per sample a list of ``(ext, offset, size, name)``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != _INDEX_VERSION:
        raise ValueError(f"{path}: not a {_INDEX_VERSION} webdataset index (header {head})")
    samples = []
    for line in lines[1:]:
        tok = line.split()
        if len(tok) % 4:
            raise ValueError(f"{path}: malformed index line {line!r}")
        samples.append([(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3])
                        for i in range(0, len(tok), 4)])
    if len(samples) != int(head[1]):
        raise ValueError(f"{path}: header says {head[1]} samples, found {len(samples)}")
    return samples


def _header(fh, at: int) -> tuple[str, int] | None:
    """(name, size) of the USTAR header at byte ``at``, None if there is none."""
    if at < 0:
        return None
    fh.seek(at)
    block = fh.read(_BLOCK)
    if len(block) < _BLOCK or not block.strip(b"\0"):
        return None
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return None
    return info.name, info.size


def index_is_current(tar_path: str | os.PathLike, samples: list[list[tuple[str, int, int, str]]]) -> bool:
    """Whether a ``.idx`` (parsed by :func:`read_index`) still describes its tar: the headers of the
    first and last indexed members are where the index says, with the same name and size.

    A member deleted (or added) after the index was written moves every later member, so an index
    that no longer matches is found with two 512-byte reads instead of a scan of the tar.
    """
    if not samples:
        return True
    try:
        size = os.path.getsize(tar_path)
        with open(tar_path, "rb") as fh:
            for ext, off, n, name in (samples[0][0], samples[-1][-1]):
                if off + n > size or _header(fh, off - _BLOCK) != (name, n):
                    return False
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- manifest

def new_manifest(*, frames_per_clip: int = 16, sample_rate: int = 16000, img_size: int = 224,
                 **extra: Any) -> dict:
    """An empty manifest (no shards yet); ``extra`` keys are kept (prepare's bookkeeping)."""
    return {"version": MANIFEST_VERSION, "shards": [], "num_samples": 0,
            "frames_per_clip": frames_per_clip, "sample_rate": sample_rate, "img_size": img_size,
            "skipped": [], **extra}


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    """Atomically write ``<root>/manifest.json``; ``num_samples`` is recomputed from the shards."""
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks keys {missing}")
    manifest = dict(manifest, num_samples=sum(int(s["count"]) for s in manifest["shards"]))
    path = Path(root) / MANIFEST_NAME
    atomic_write_json(path, manifest, indent=1)
    return path


def read_manifest(root: str | os.PathLike) -> dict:
    """Read and check ``<root>/manifest.json`` (or a path to the file itself)."""
    path = Path(root)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"no manifest at {str(path)!r}; run python -m tgdp.prepare first or give the shard folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); re-run python -m tgdp.prepare into a new --out") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: unsupported manifest version "
                         f"{manifest.get('version') if isinstance(manifest, dict) else manifest!r}; "
                         "re-run python -m tgdp.prepare")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ShardError(f"{path}: manifest lacks keys {missing}; re-run python -m tgdp.prepare")
    return manifest
