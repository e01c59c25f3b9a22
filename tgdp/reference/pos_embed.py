"""Fixed 2-D sin-cos position tables (spec §1.3), computed in float32 numpy like the official code.

Layout of a table for a grid of ``rows x cols`` tokens (token index = row * cols + col) and ``dim``
channels: channels ``[0, dim/2)`` encode the **column** and ``[dim/2, dim)`` the **row** (the MAE
"w first" quirk). For audio the grid is (freq rows, time cols), so the first half encodes time.
Each half is a 1-D embedding ``[sin(p * w_0..w_{E/2-1}), cos(p * w_0..w_{E/2-1})]`` with
``w_i = 1 / 10000 ** (i / (E/2))``: all sines, then all cosines.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: [M] positions -> [M, dim] float32 (dim even)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim={dim} must be even")
    # float32 throughout: the official tables were built this way (up to ~1.5e-6 from float64).
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = (np.float32(1.0) / np.float32(10000.0) ** omega).astype(np.float32)
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
    """Table for a ``rows x cols`` grid: [rows * cols, dim] float32, row-major tokens, no CLS slot."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim={dim} must be a multiple of 4")
    r, c = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32),
                       indexing="ij")  # [rows, cols] each; flattening is row-major = token order
    emb_col = sincos_1d(dim // 2, c)
    emb_row = sincos_1d(dim // 2, r)
    return np.concatenate([emb_col, emb_row], axis=1)
