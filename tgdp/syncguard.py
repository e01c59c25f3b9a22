"""Find host syncs on any device: a dispatch mode that flags every op that reads device data on the host.

On a GPU, an op whose result the host must read (``.item()``, ``bool(t)``, a data-dependent output
shape such as ``nonzero``, a device->host copy, a blocking host->device copy) makes the CPU wait
for every kernel queued before it, so data prefetch and kernel launches stop overlapping. On the
CPU nothing waits, but the op is the same: :class:`HostSyncGuard` recognises these ops *by name*,
so a CPU test finds the syncs a GPU run would have (``tests/test_syncguard.py``,
``tests/test_hot_path.py`` runs a whole ``train_step`` under it).

Usage::

    from tgdp.syncguard import HostSyncGuard, HostSyncError

    with HostSyncGuard():                      # raises HostSyncError at the first host-reading op
        train_step(state, batch, step)

    with HostSyncGuard(raise_on_sync=False) as g:
        train_step(state, batch, step)
    print(len(g.syncs), g.syncs)               # e.g. ['aten._local_scalar_dense.default']

What counts as a host sync (``syncs`` holds these names):

- scalar reads: ``aten.item``, ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``,
  ``bool(t)``, ``if t:``, a 0-dim tensor passed where a Python scalar is expected), ``aten.is_nonzero``,
  ``aten.equal``, ``aten.allclose``;
- data-dependent output shapes: ``nonzero``/``argwhere``, ``masked_select``, the ``unique`` family,
  ``bincount``, ``repeat_interleave`` without ``output_size``, indexing or ``index_put_`` with a
  boolean mask (``x[mask]``);
- copies: device -> host (``.cpu()``, ``.to("cpu")``, ``copy_`` into a host tensor) and blocking
  host -> device (``.to(dev)`` without ``non_blocking``; PyTorch synchronises the stream after it);
- Python reads that never reach the dispatcher: ``Tensor.tolist``, ``Tensor.numpy``,
  ``Tensor.__array__`` (caught by a companion ``TorchFunctionMode`` the guard enters with itself).

Limits: ``torch.compile`` does not run its compiled graph under an active dispatch mode the same
way (Dynamo skips frames inside a user dispatch mode), so guard the *eager* step. On a CUDA device,
:func:`cuda_sync_debug` counts the syncs the CUDA runtime itself reports (compiled code included).
Host-side tensors (the packer's masks, lengths read before the copy) are fine to read: run that
code outside the guard, as ``train_step`` does.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostSyncGuard", "HostSyncError", "SYNC_OPS", "cuda_sync_debug"]

# Ops that always read device data on the host (overload-independent packet names).
SYNC_OPS = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::nonzero", "aten::argwhere", "aten::nonzero_numpy", "aten::masked_select",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::bincount",
})

_PY_SYNCS = {"tolist": "Tensor.tolist", "numpy": "Tensor.numpy", "__array__": "Tensor.__array__"}


class HostSyncError(RuntimeError):
    """Raised by :class:`HostSyncGuard` (``raise_on_sync=True``) at the first host-reading op."""


def _is_host(device: torch.device) -> bool:
    return device.type == "cpu"


def _copy_sync(name: str, args, kwargs) -> bool:
    """A copy the host waits for: device -> host, or host -> device without ``non_blocking``."""
    if name == "aten::_to_copy":
        src = args[0]
        dst = kwargs.get("device")
        if dst is None or torch.device(dst) == src.device:
            return False
        dst = torch.device(dst)
        if _is_host(dst):
            return not _is_host(src.device)
        return _is_host(src.device) and not kwargs.get("non_blocking", False)
    if name == "aten::copy_":
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if dst.device == src.device:
            return False
        if _is_host(dst.device):
            return True
        return _is_host(src.device) and not non_blocking
    return False


def _data_dependent(name: str, overload: str, args, kwargs) -> bool:
    """Ops whose output shape (or work) depends on values only in some of their forms."""
    if name in ("aten::index", "aten::_index_put_impl_", "aten::index_put", "aten::index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "aten::repeat_interleave":
        # .Tensor(repeats, *, output_size) / .self_Tensor(self, repeats, dim, *, output_size): the
        # output length is sum(repeats), read on the host unless output_size is given
        repeats = args[0] if overload == "Tensor" else (args[1] if len(args) > 1 else kwargs.get("repeats"))
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


class _PyReads(TorchFunctionMode):
    """Companion of :class:`HostSyncGuard`: Python-level reads that bypass the dispatcher."""

    def __init__(self, guard: "HostSyncGuard"):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _PY_SYNCS and args and isinstance(args[0], torch.Tensor):
            if self.guard._reads_device((args[0],), {}):
                self.guard._found(_PY_SYNCS[name])
            self.guard._quiet += 1     # the copy it makes underneath is the same sync: count it once
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.guard._quiet -= 1
        return func(*args, **(kwargs or {}))


class HostSyncGuard(TorchDispatchMode):
    """Context manager recording (and by default refusing) every host-reading op run inside it.

    raise_on_sync: raise :class:`HostSyncError` naming the op at the first one (default); with
    False, only record. ``syncs``: names of the ops seen, in order (e.g.
    ``"aten._local_scalar_dense.default"``, ``"Tensor.tolist"``); ``len(syncs)`` counts them.
    Device-agnostic: ops are matched by name, so on a CPU it finds the syncs a GPU run would have.
    cpu_is_host: treat CPU tensors as host data, so reading them is no sync (only reads of
    non-CPU tensors and the copies count). For code that mixes host bookkeeping with device work
    (data loaders, the prefetcher), run on a GPU or with meta tensors standing in for device ones.
    """

    def __init__(self, raise_on_sync: bool = True, *, cpu_is_host: bool = False):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.cpu_is_host = cpu_is_host
        self.syncs: list[str] = []
        self._quiet = 0
        self._py = _PyReads(self)

    def _reads_device(self, args, kwargs) -> bool:
        if not self.cpu_is_host:
            return True
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        return any(not _is_host(t.device) for t in tensors)

    def _found(self, what: str) -> None:
        self.syncs.append(what)
        if self.raise_on_sync:
            raise HostSyncError(f"host sync: {what} (the host would wait for the device here); "
                                "move it to a log step or keep the value on the device")

    def __enter__(self):
        out = super().__enter__()
        self._py.__enter__()
        return out

    def __exit__(self, *exc):
        self._py.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        reads = (name in SYNC_OPS or _data_dependent(name, func._overloadname, args, kwargs)) and \
            self._reads_device(args, kwargs)
        if not self._quiet and (reads or _copy_sync(name, args, kwargs)):
            self._found(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_sync_debug():
    """CUDA only: count the synchronising calls the CUDA runtime sees (``torch.cuda.set_sync_debug_mode``),
    compiled kernels and CUDA graphs included. Yields a list that holds one message per sync once the
    block has exited."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_sync_debug needs a CUDA device; on a CPU use HostSyncGuard")
    found: list[str] = []
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())
