"""Evaluation: zero-shot retrieval, attention probing, plots (``python -m tgdp.eval``).

- :mod:`tgdp.eval.retrieval`: batched, chunked retrieval metrics with the official tie semantics.
- :mod:`tgdp.eval.probe`: the attention probe on frozen per-frame globals, mAP / top-1.
- :mod:`tgdp.eval.plots` (+ :mod:`tgdp.eval.tsne`): t-SNE, retrieval examples, loss curves.
- :mod:`tgdp.eval.common`: checkpoint -> frozen encoder, feature extraction, atomic writes.

The exports below are resolved on first use (module ``__getattr__``): importing the package, as
``python -m tgdp.eval --help`` does, imports no torch.
"""

import importlib

_EXPORTS = {"format_table": "retrieval", "retrieval_metrics": "retrieval", "similarity_matrix": "retrieval"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:  # AttributeError (not another error) lets `from tgdp.eval import <submodule>` work
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
