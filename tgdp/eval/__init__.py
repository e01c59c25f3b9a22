"""Evaluation: zero-shot retrieval, attention probing, plots (``python -m tgdp.eval``).

- :mod:`tgdp.eval.retrieval`: batched, chunked retrieval metrics with the official tie semantics.
- :mod:`tgdp.eval.probe`: the attention probe on frozen per-frame globals, mAP / top-1.
- :mod:`tgdp.eval.plots` (+ :mod:`tgdp.eval.tsne`): t-SNE, retrieval examples, loss curves.
- :mod:`tgdp.eval.common`: checkpoint -> frozen encoder, feature extraction, atomic writes.

Only torch is imported here; matplotlib and the data loader are imported where they are used.
"""

from tgdp.eval.retrieval import format_table, retrieval_metrics, similarity_matrix

__all__ = ["format_table", "retrieval_metrics", "similarity_matrix"]
