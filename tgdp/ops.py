"""Public fused ops: ``from tgdp.ops import patch_global_scores, topk_visible, masked_mse``.

Model code calls only this module, and other MAE projects can import it without the model. Each op
validates its inputs (shape, dtype, device, k: metadata only, no host sync) and then dispatches:

- the Triton kernels in ``tgdp.kernels`` (the repository's ``kernels/``) when every tensor is on
  CUDA and Triton is importable, or when forced (``TGDP_FORCE_TRITON=1`` in the environment, or
  ``with tgdp.ops.force_triton():``), which is how tests run the kernels on CPU under
  ``TRITON_INTERPRET=1``;
- otherwise the plain-torch reference in ``tgdp/reference/``.

``import tgdp.ops`` never imports triton: the kernels are imported on the first Triton dispatch.
:func:`bytes_avoided` computes what the fused path does not materialise (docs/ops.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from tgdp.reference import masked_mse as _mse_ref
from tgdp.reference import patch_global_scores as _pgs_ref
from tgdp.reference import topk_visible as _topk_ref

__all__ = ["patch_global_scores", "topk_visible", "masked_mse", "force_triton", "triton_available",
           "use_triton", "bytes_avoided", "materialised_bytes"]

# Probed once without importing triton (find_spec only locates it); None in sys.modules = blocked.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_force_depth = 0


def triton_available() -> bool:
    """True when the triton package can be found (it is imported only on first use)."""
    return _TRITON_FOUND


@contextlib.contextmanager
def force_triton(enabled: bool = True) -> Iterator[None]:
    """Route every op to the Triton kernels inside the block (CPU tensors need TRITON_INTERPRET=1).

    Raises RuntimeError at once (one line saying what to install or set) when the kernels cannot
    run here: triton missing, or neither a CUDA GPU nor the Triton interpreter.
    """
    global _force_depth
    if enabled:
        _check_can_force("force_triton()")
    delta = 1 if enabled else 0
    _force_depth += delta
    try:
        yield
    finally:
        _force_depth -= delta


def _check_can_force(how: str) -> None:
    if not _TRITON_FOUND:
        raise RuntimeError(f"tgdp.ops: the Triton path is forced ({how}) but triton is not importable; "
                           "pip install 'tgdp[triton]'")
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
        # Without this, the first launch fails deep in Triton with "0 active drivers".
        raise RuntimeError(f"tgdp.ops: the Triton path is forced ({how}) but there is no CUDA GPU; "
                           "to run the kernels on the CPU set TRITON_INTERPRET=1 in the environment "
                           "before starting Python")


def _forced() -> bool:
    return _force_depth > 0 or os.environ.get("TGDP_FORCE_TRITON", "0") == "1"


def use_triton(*tensors: Tensor | None) -> bool:
    """The one dispatch rule: forced, or all given tensors on CUDA with triton importable."""
    if _forced():
        if _force_depth == 0:                   # forced by the environment only
            _check_can_force("TGDP_FORCE_TRITON=1")
        return True
    return _TRITON_FOUND and all(t.is_cuda for t in tensors if t is not None)


def _kernels():
    # Lazy: the only import of triton, on the first Triton dispatch.
    import tgdp.kernels.masked_mse
    import tgdp.kernels.patch_global_scores
    import tgdp.kernels.topk_visible

    return tgdp.kernels


def patch_global_scores(q: Tensor, k: Tensor, lse: Tensor | None = None, *, scale: float,
                        global_index: int = 0, renormalize: bool = False,
                        direction: str = "patch_to_cls") -> Tensor:
    """Head-mean softmax attention between each patch and the global token, without the L x L map.

    q, k: [B, H, L, d] (sequence = [CLS, patches], CLS at ``global_index``); lse: [B, H, L] row
    log-normaliser of the scaled logits (e.g. FlashAttention's ``softmax_lse``) or None (computed by
    a streaming online softmax). direction "patch_to_cls" = the official CLS-key column,
    "cls_to_patch" = the CLS-query row. Returns [B, L-1] fp32 (forward only on the Triton path).
    """
    _pgs_ref.check_inputs(q, k, lse, scale, global_index, direction)
    if use_triton(q, k, lse):
        impl = _kernels().patch_global_scores.patch_global_scores
    else:
        impl = _pgs_ref.patch_global_scores
    return impl(q, k, lse, scale=scale, global_index=global_index, renormalize=renormalize,
                direction=direction)


def topk_visible(scores: Tensor, k: int, tokens: Tensor | None = None):
    """Keep the k highest scores per row (descending, ties -> lower index; NaN ranks first).

    scores: [B, N] float (random masking: pass ``-u``); tokens: [B, N, D] | None.
    Returns (ids_keep [B, k] int64, ids_restore [B, N] int64, mask [B, N] fp32 with 1 = removed,
    visible [B, k, D] | None); gradients flow from ``visible`` into ``tokens``.
    """
    _topk_ref.check_inputs(scores, k, tokens)
    impl = _kernels().topk_visible.topk_visible if use_triton(scores, tokens) else _topk_ref.topk_visible
    return impl(scores, k, tokens)


def masked_mse(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = False) -> Tensor:
    """MAE loss over masked patches: pred [B, N, p*p*C], imgs [B, C, H, W] (any strides), mask [B, N]
    (1 = masked) -> 0-dim fp32. ``norm_pix`` standardises each target patch (unbiased var + 1e-6).
    Gradient flows to ``pred`` only.
    """
    _mse_ref.check_inputs(pred, imgs, mask, patch_size, norm_pix)
    if use_triton(pred, imgs, mask):
        return _kernels().masked_mse.masked_mse(pred, imgs, mask, patch_size, norm_pix)
    return _mse_ref.masked_mse(pred, imgs, mask, patch_size, norm_pix)


# ---- bytes the fused path avoids materialising ------------------------------------------------

def materialised_bytes(fn: Callable[[], object]) -> int:
    """Bytes of every new tensor the aten ops inside ``fn()`` allocate (views and in-place results
    excluded). Run it on ``device="meta"`` tensors: nothing is computed, any shape is free."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            seen = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, Tensor) and t.untyped_storage()._cdata not in seen:
                    seen.add(t.untyped_storage()._cdata)
                    _Count.total += t.untyped_storage().nbytes()
            return out

    with _Count():
        fn()
    return _Count.total


def bytes_avoided(op: str, dtype: torch.dtype = torch.float32, **shape: int) -> dict[str, int]:
    """Reference (measured on meta tensors, forward + backward) vs fused (the kernels' own buffers,
    counted from their launchers) allocations of one op call. Shapes by op:

    patch_global_scores: batch, heads, length, head_dim     (no lse: the teacher's case)
    topk_visible:        batch, n, k, dim                   (forward + backward of the gather)
    masked_mse:          batch, channels, height, width, patch_size, norm_pix (0/1)
    Returns {"reference", "fused", "avoided"} in bytes.
    """
    meta, e = dict(device="meta", dtype=dtype), torch.tensor([], dtype=dtype).element_size()
    if op == "patch_global_scores":
        b, h, l, d = (shape[s] for s in ("batch", "heads", "length", "head_dim"))
        q = torch.empty(b, h, l, d, **meta)
        ref = materialised_bytes(lambda: _pgs_ref.patch_global_scores(q, q, scale=d ** -0.5))
        fused = b * (l - 1) * 4                                           # the fp32 output only
    elif op == "topk_visible":
        b, n, k, d = (shape[s] for s in ("batch", "n", "k", "dim"))
        scores = torch.empty(b, n, device="meta")
        tokens = torch.empty(b, n, d, **meta, requires_grad=True)
        grad = torch.empty(b, k, d, **meta)

        def run_ref():
            _topk_ref.topk_visible(scores, k, tokens)[3].backward(grad)
        ref = materialised_bytes(run_ref)
        fused = b * k * 8 + b * n * (8 + 4) + b * k * d * e + b * n * d * e   # ids, mask, visible, grad
    elif op == "masked_mse":
        b, c, hh, ww, p = (shape[s] for s in ("batch", "channels", "height", "width", "patch_size"))
        norm = bool(shape.get("norm_pix", 1))
        n, dim = (hh // p) * (ww // p), p * p * c
        pred = torch.empty(b, n, dim, **meta, requires_grad=True)
        imgs = torch.empty(b, c, hh, ww, **meta)
        mask = torch.empty(b, n, device="meta")
        ref = materialised_bytes(lambda: _mse_ref.masked_mse(pred, imgs, mask, p, norm).backward())
        fused = b * n * 4 + 3 * 4 + b * n * dim * e    # per-patch partials, scalars, grad_pred
    else:
        raise ValueError(f"op={op!r} must be 'patch_global_scores', 'topk_visible' or 'masked_mse'")
    return {"reference": ref, "fused": fused, "avoided": ref - fused}
