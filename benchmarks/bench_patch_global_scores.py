"""patch_global_scores at the paper's shapes: B 64-256, H 12, head_dim 64, L = 1 + 208 (audio) /
1 + 196 (video). Forward only (the teacher has no backward). With ``lse`` = the FlashAttention case."""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.patch_global_scores import attention_lse
from tgdp.reference.patch_global_scores import patch_global_scores as reference


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("length", [209, 197], ids=["audio", "video"])
def test_patch_global_scores(timed, pick, device, op_batch, length, op_dtype, with_lse, op_provider):
    h, d = 12, 64
    q = torch.randn(op_batch, h, length, d, device=device, dtype=op_dtype)
    k = torch.randn(op_batch, h, length, d, device=device, dtype=op_dtype)
    lse = attention_lse(q, k, d ** -0.5) if with_lse else None
    fn = pick(op_provider, ops.patch_global_scores, reference)
    e = q.element_size()
    nbytes = 2 * q.numel() * e + op_batch * (length - 1) * 4 + (lse.numel() * 4 if with_lse else 0)
    flops = 2 * op_batch * h * length * d * (1 if with_lse else length + 1)
    timed(lambda: fn(q, k, lse, scale=d ** -0.5), nbytes=nbytes, flops=flops)
