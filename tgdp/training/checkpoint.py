"""Checkpoint files (sealed with a sha256, owned by a run) and the checkpoint folder of a run.

A checkpoint is one ``torch.save`` zip file. :func:`write_checkpoint` and :func:`read_checkpoint`
are the only way tgdp writes and reads ``.pt`` files (training, ``tgdp.eval``, ``tgdp.convert``).

**Seal.** :func:`write_checkpoint` serialises in memory, computes the sha256 of the bytes, and
stores it, with the run id and step, as the zip archive's *comment* (``TGDP-CKPT1 {json}`` after
the end-of-central-directory record). Any zip reader, ``torch.load`` included, ignores a comment,
so the file stays a plain torch checkpoint; the checksum travels with every copy of it.
:func:`read_checkpoint` hashes the file (streamed, before unpickling) and refuses a mismatch with
:class:`CheckpointError` naming the path; a file without a seal (official checkpoints, tgdp files
from before the seal) loads unverified. Loading is always ``weights_only=True``; a file holding
other Python objects is refused without repeating torch's advice to disable that.

**Training checkpoints** (:class:`CheckpointManager`) are ``<out_dir>/checkpoints/step-NNNNNNNN.pt``
holding the full state: ``model`` (student state dict, official parameter names), ``teacher``,
``optimizer``, ``scheduler``, ``step``, ``data`` (position), ``rng`` (per-rank RNG states),
``config`` (``tgdp.configs.to_dict``), ``run_id``. FSDP2 runs gather a *full* state dict so the
file has the same layout whatever the parallelism; this costs one all-gather of the model per save.

- Atomicity: bytes go to a hidden temporary in the same folder, fsync'ed, ``os.replace``'d onto the
  final name (:mod:`tgdp.atomic`); a failed write removes its temporary and names the path.
- ``latest`` (``step-NNNNNNNN.pt run=<id> sha256=<hex>``) is written only after the checkpoint it
  names was re-read from disk and matched its checksum, so it always names an existing, verified file.
- Ownership: pruning (keep-last-N) deletes only older checkpoints sealed with *this* run's id. Files
  of other runs, and files tgdp did not seal, are never deleted; one in the way of a new
  checkpoint is renamed aside (``<name>.displaced-N``).
- Resume (:meth:`CheckpointManager.resume`): the run named by ``latest`` (else the newest sealed
  checkpoint), its checkpoints newest first; a corrupt or truncated one is reported by path and the
  next older intact one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tgdp.atomic import TMP_PREFIX, atomic_write_bytes
from tgdp.cli import UserError

__all__ = ["CheckpointManager", "CheckpointError", "Seal", "write_checkpoint", "read_checkpoint", "read_seal",
           "verify_checkpoint", "rng_state", "set_rng_state", "model_state", "load_model_state",
           "optimizer_state", "load_optimizer_state"]

_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")
_MAGIC = b"TGDP-CKPT1 "
_EOCD = b"PK\x05\x06"      # zip end-of-central-directory signature; the record is 22 bytes + comment
_EOCD_LEN = 22
_CHUNK = 1 << 22


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, corrupt or not what was expected; the message names its path."""


@dataclass(frozen=True)
class Seal:
    """What :func:`write_checkpoint` stored in a file's zip comment."""

    sha256: str
    run_id: str | None
    step: int | None
    eocd: int            # offset of the end-of-central-directory record (the hash covers the bytes before
                         # its comment, with the comment length read as 0)


def _seal_bytes(data: bytes, run_id: str | None, step: int | None) -> bytes:
    """``torch.save`` bytes -> the same archive with the seal as its zip comment."""
    at = len(data) - _EOCD_LEN
    if at < 0 or data[at:at + 4] != _EOCD or data[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end its zip archive with a comment-free EOCD record")
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "run_id": run_id, "step": step}
    comment = _MAGIC + json.dumps(meta, sort_keys=True).encode()
    return data[:-2] + struct.pack("<H", len(comment)) + comment


def read_seal(path: str | Path) -> Seal | None:
    """The seal of a checkpoint file (reads only its tail), or None if it has none."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    k = tail.rfind(_MAGIC)
    if k < _EOCD_LEN:
        return None
    comment = tail[k:]
    at = k - _EOCD_LEN                         # the comment follows the 22-byte EOCD record
    if tail[at:at + 4] != _EOCD or struct.unpack("<H", tail[k - 2:k])[0] != len(comment):
        return None
    try:
        meta = json.loads(comment[len(_MAGIC):])
        digest, run_id, step = str(meta["sha256"]), meta.get("run_id"), meta.get("step")
    except (ValueError, KeyError, TypeError):
        return None
    return Seal(digest, None if run_id is None else str(run_id), None if step is None else int(step),
                size - len(tail) + at)


def _digest(path: Path, seal: Seal) -> str:
    """sha256 of the file as torch.save wrote it: the bytes up to the comment, comment length 0."""
    h = hashlib.sha256()
    left = seal.eocd + _EOCD_LEN - 2
    with open(path, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    h.update(b"\0\0")
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> Seal | None:
    """Check a file against its seal: the seal, or None for an unsealed file; CheckpointError on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    seal = read_seal(path)
    if seal is not None and _digest(path, seal) != seal.sha256:
        raise CheckpointError(f"checkpoint {path} is corrupt (its sha256 does not match the checksum written "
                              "with it); use an intact copy or an earlier checkpoint")
    return seal


def write_checkpoint(state: dict, path: str | Path, *, run_id: str | None = None, step: int | None = None) -> Path:
    """Write one checkpoint file atomically, sealed with its sha256 (and ``run_id``/``step`` when given).

    Every tgdp writer of ``.pt`` files goes through here. Raises ``OSError`` naming ``path`` when the
    write fails (the temporary is removed, an earlier file under that name is untouched).
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, _seal_bytes(buf.getvalue(), run_id, step))


def read_checkpoint(path: str | Path, map_location="cpu", *, require_seal: bool = False) -> dict:
    """Read a checkpoint file, weights only, after checking its seal (see the module doc).

    Raises :class:`CheckpointError` (a :class:`tgdp.cli.UserError`, one line naming the path) for a
    missing, corrupt, truncated or foreign file, or for one holding arbitrary Python objects.
    ``require_seal``: also refuse a file without a seal.
    """
    path = Path(path)
    seal = verify_checkpoint(path)
    if seal is None and require_seal:
        raise CheckpointError(f"checkpoint {path} has no tgdp checksum (written by another tool or an older "
                              "tgdp); it cannot be verified")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways inside the zip/pickle readers
        raise CheckpointError(_load_failure(path, exc)) from None


def _load_failure(path, exc: Exception) -> str:
    # torch's own message advises weights_only=False (runs code from the file): never pass it on
    found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(exc), re.IGNORECASE)
    if found:
        return (f"checkpoint {path} holds a pickled {found.group(1)} object, which tgdp refuses to load "
                "(unpickling objects can run arbitrary code); save only tensors and plain containers")
    return (f"checkpoint {path} is not a readable torch checkpoint ({type(exc).__name__}; truncated, corrupt "
            "or another format); use an intact copy or an earlier checkpoint")


def rng_state() -> dict:
    """This process's global RNG states (torch CPU/CUDA, numpy, python) as weights_only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Checkpoints of one run folder: ``save``, ``resume``, the ``latest`` pointer, keep-last-N of this run.

    ``run_id``: the run whose checkpoints :meth:`save` writes and prunes (set it before saving).
    Only rank 0 should call :meth:`save` (and the constructor with ``clean=True``).
    """

    REQUIRED = ("model", "teacher", "optimizer", "scheduler", "step", "data", "config")

    def __init__(self, directory: str | Path, keep_last: int = 3, clean: bool = True, run_id: str | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be >= 1")
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.run_id = run_id
        self.notes: list[str] = []
        if clean and self.dir.is_dir():
            for p in self.dir.glob(f"{TMP_PREFIX}*.tmp"):
                p.unlink(missing_ok=True)  # a tgdp writer killed before its os.replace

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        """Every file named like a checkpoint (whoever wrote it), oldest step first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def sealed(self) -> list[tuple[Path, Seal]]:
        """Checkpoint-named files that carry a tgdp seal, with it, oldest step first."""
        out = []
        for p in self.checkpoints():
            try:
                seal = read_seal(p)
            except OSError:
                seal = None
            if seal is not None:
                out.append((p, seal))
        return out

    def own(self, run_id: str | None = None) -> list[Path]:
        """Checkpoints sealed with ``run_id`` (default: this manager's run), oldest first."""
        rid = self.run_id if run_id is None else run_id
        return [p for p, seal in self.sealed() if rid is not None and seal.run_id == rid]

    def pointer(self) -> tuple[str, str | None] | None:
        """``(file name, run id)`` from ``latest`` (run id None in the pre-seal format), or None."""
        ptr = self.dir / "latest"
        try:
            words = ptr.read_text().split()
        except (OSError, UnicodeDecodeError):
            return None
        if not words or not _CKPT_RE.match(words[0]):
            return None
        run = next((w[4:] for w in words[1:] if w.startswith("run=")), None)
        return words[0], run

    def latest(self) -> Path | None:
        """The checkpoint named by ``latest`` if it exists, else the newest sealed one, else the newest file."""
        ptr = self.pointer()
        if ptr is not None and (self.dir / ptr[0]).is_file():
            return self.dir / ptr[0]
        sealed = self.sealed()
        if sealed:
            return sealed[-1][0]
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def folder_run(self) -> str | None:
        """The run that owns this folder: the one ``latest`` names, else the newest sealed checkpoint's."""
        ptr = self.pointer()
        if ptr is not None and ptr[1]:
            return ptr[1]
        sealed = self.sealed()
        return sealed[-1][1].run_id if sealed else None

    def save(self, state: dict, step: int) -> Path:
        """Write ``step``'s checkpoint sealed with this run's id, verify it, point ``latest`` at it, prune."""
        if self.run_id is None:
            raise RuntimeError("CheckpointManager.save needs a run_id")
        path = self.dir / self.name(step)
        if path.exists():
            seal = read_seal(path) if path.is_file() else None
            if seal is None or seal.run_id != self.run_id:   # never overwrite a file this run did not write
                aside = self._aside(path)
                path.rename(aside)
                self.notes.append(f"{path} was not written by this run; moved to {aside.name}")
        write_checkpoint(state, path, run_id=self.run_id, step=step)
        seal = verify_checkpoint(path)   # re-read from disk: `latest` only ever names a verified file
        atomic_write_bytes(self.dir / "latest", f"{path.name} run={self.run_id} sha256={seal.sha256}\n".encode())
        own = self.own()
        for old in own[:max(0, len(own) - self.keep_last)]:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    @staticmethod
    def _aside(path: Path) -> Path:
        n = 1
        while path.with_name(f"{path.name}.displaced-{n}").exists():
            n += 1
        return path.with_name(f"{path.name}.displaced-{n}")

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> dict:
        """Read and check one training checkpoint (seal verified; CheckpointError otherwise)."""
        state = read_checkpoint(path, map_location=map_location)
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a tgdp training "
                                  "checkpoint (a dict)")
        for key in cls.REQUIRED:
            if key not in state:
                raise CheckpointError(f"checkpoint {path} has no {key!r} entry; not a tgdp training checkpoint")
        return state

    def resume(self, map_location="cpu") -> tuple[Path, dict] | None:
        """The newest intact checkpoint of the folder's run -> ``(path, state)``; None if there is none.

        Candidates: the checkpoints sealed with the folder's run id (:meth:`folder_run`), newest first;
        a folder of only unsealed checkpoints (an older tgdp) falls back to those, unverified. A
        corrupt or unreadable candidate is noted in :attr:`notes` and the next one is tried;
        CheckpointError when checkpoints exist but none is intact.
        """
        run = self.folder_run()
        sealed = self.sealed()
        if run is not None:
            cands = [p for p, seal in sealed if seal.run_id == run]
            ptr = self.pointer()
            if ptr is not None and ptr[1] == run and (self.dir / ptr[0]).is_file() and self.dir / ptr[0] not in cands:
                cands.append(self.dir / ptr[0])   # `latest` says it is this run's, though its seal is gone
                cands.sort(key=lambda p: p.name)
            foreign = [p.name for p, seal in sealed if seal.run_id != run]
            unsealed = [p.name for p in self.checkpoints() if p not in cands and p.name not in foreign]
            if foreign:
                self.notes.append(f"ignored, written by other runs (never deleted): {', '.join(foreign)}")
            if unsealed:
                self.notes.append(f"ignored, no tgdp checksum (truncated, or not written by tgdp; never deleted): "
                                  f"{', '.join(unsealed)}")
        else:
            cands = self.checkpoints()
            if cands:
                self.notes.append(f"{self.dir} holds checkpoints without a tgdp checksum (older tgdp or another "
                                  "tool); resuming unverified")
        failed = []
        for path in reversed(cands):
            try:
                state = self.load(path, map_location=map_location)
            except CheckpointError as exc:
                failed.append(str(exc))
                self.notes.append(f"{exc}; trying the previous checkpoint")
                continue
            if failed:
                self.notes.append(f"resuming from the newest intact checkpoint, {path.name}")
            self.run_id = run if run is not None else state.get("run_id")
            return path, state
        if failed:
            raise CheckpointError(f"no intact checkpoint in {self.dir}: " + "; ".join(failed)
                                  + "; start a new run with --train.overwrite true or another --train.out_dir")
        return None


# ----------------------------------------------------------------------------- model/optimizer state

def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(module: torch.nn.Module, fsdp: bool) -> dict:
    """Full (unsharded) state dict on CPU; for FSDP2 a collective every rank must join."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(module, options=_full_options())
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_model_state(module: torch.nn.Module, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        module.load_state_dict(state, strict=True)


def optimizer_state(module: torch.nn.Module, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(module, optimizer, options=_full_options())
    return optimizer.state_dict()


def load_optimizer_state(module: torch.nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        # strict=False: parameters that never receive a gradient (the unused LayerNorm pairs of the
        # official block) have no AdamW state, exactly as in the run that saved it
        set_optimizer_state_dict(module, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        optimizer.load_state_dict(state)
