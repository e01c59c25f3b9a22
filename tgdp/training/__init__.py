"""Training internals behind ``python -m tgdp.train``: loop, schedule, checkpoints, distribution, logging.

``loop`` (build + ``train_step`` + ``Trainer``), ``schedule`` (warmup + cosine), ``checkpoint``
(atomic files, full state), ``distributed`` (process group, DDP/FSDP2, sharded EMA), ``sources``
(noise source, loader position, CUDA prefetch), ``logger`` (progress, JSONL/CSV, TensorBoard),
``launch`` (one run: checks before data, data root, start-up ``header``, Trainer), ``demo`` (the main
job). Submodules import torch; this package file does not import them.
"""
