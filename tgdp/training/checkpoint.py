"""Atomic, self-describing training checkpoints with a ``latest`` pointer and keep-last-N pruning.

A checkpoint is one ``torch.save`` file ``step-NNNNNNNN.pt`` holding the full state: ``model``
(student state dict, official parameter names), ``teacher``, ``optimizer``, ``scheduler``, ``step``,
``data`` (position), ``rng`` (per-rank RNG states), ``config`` (``tgdp.configs.to_dict``).
FSDP2 runs gather a *full* state dict (``torch.distributed.checkpoint.state_dict`` with
``full_state_dict=True``) so the file has the same layout whatever the parallelism, and eval tools
read it directly; this costs one all-gather of the model per save.

Atomicity: the bytes go to a hidden temporary in the same folder, are flushed and fsync'ed, then
``os.replace``'d onto the final name (and the folder fsync'ed), so a crash at any instant leaves
either the old set of checkpoints or the new one — never a torn ``step-*.pt``. ``latest`` is
written the same way, after the checkpoint it names. Stale temporaries of a killed writer are
removed when a manager opens the folder.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from tgdp.atomic import TMP_PREFIX, atomic_torch_save, atomic_write_bytes

__all__ = ["CheckpointManager", "CheckpointError", "write_checkpoint", "read_checkpoint", "rng_state", "set_rng_state", "model_state",
           "load_model_state", "optimizer_state", "load_optimizer_state"]

_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt or not what was expected; the message names its path."""


def write_checkpoint(state: dict, path: str | Path) -> Path:
    """Write one checkpoint file atomically (every tgdp writer of ``.pt`` files goes through here)."""
    return atomic_torch_save(state, path)


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint file written by :func:`write_checkpoint` (or an official one), weights only.

    A file that is not a torch checkpoint, is truncated, or holds pickled objects other than tensors
    and plain containers raises :class:`CheckpointError` naming it (``OSError`` passes through)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch.load fails with many types (UnpicklingError, KeyError, EOFError...)
        raise CheckpointError(_load_failure(path, exc)) from exc


def _load_failure(path, exc: Exception) -> str:
    # torch's own message advises weights_only=False (runs code from the file): never pass it on
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if found:
        return (f"checkpoint {path} holds a pickled {found.group(1)} object, which tgdp refuses to load "
                "(unpickling objects can run code); save only tensors and plain containers")
    return (f"{path} is not a readable torch checkpoint ({type(exc).__name__}; truncated, corrupt or "
            "another format); re-create or re-download it")


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
    """Checkpoints of one run folder: ``save``/``load``, the ``latest`` pointer, keep-last-N.

    Only rank 0 should call :meth:`save` (and the constructor with ``clean=True``).
    """

    def __init__(self, directory: str | Path, keep_last: int = 3, clean: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be >= 1")
        self.dir = Path(directory)
        self.keep_last = keep_last
        if clean:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in self.dir.glob(f"{TMP_PREFIX}*"):
                p.unlink(missing_ok=True)  # a writer killed before its os.replace

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}.pt"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint named by ``latest``, else the newest on disk, else None."""
        ptr = self.dir / "latest"
        if ptr.is_file():
            p = self.dir / ptr.read_text().strip()
            if p.is_file():
                return p
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, state: dict, step: int) -> Path:
        path = self.dir / self.name(step)
        write_checkpoint(state, path)
        atomic_write_bytes(self.dir / "latest", (path.name + "\n").encode())
        for old in self.checkpoints()[:-self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path, map_location="cpu") -> dict:
        state = read_checkpoint(path, map_location=map_location)
        for key in ("model", "teacher", "optimizer", "scheduler", "step", "data", "config"):
            if key not in state:
                raise ValueError(f"checkpoint {path} has no {key!r} entry; not a tgdp training checkpoint")
        return state


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
