"""topk_visible at the paper's shapes: B 64-256, N 208 / 196, k at 75 % masking, D 768.
fwd = ranking + gather, bwd = the gather's backward, fwd+bwd = both."""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.topk_visible import topk_visible as reference


@pytest.mark.parametrize("n", [208, 196], ids=["audio", "video"])
def test_topk_visible(timed, pick, device, op_batch, n, op_dtype, op_mode, op_provider):
    d, k = 768, n // 4
    scores = torch.randn(op_batch, n, device=device)
    tokens = torch.randn(op_batch, n, d, device=device, dtype=op_dtype, requires_grad=True)
    grad = torch.randn(op_batch, k, d, device=device, dtype=op_dtype)
    fn = pick(op_provider, ops.topk_visible, reference)
    e = tokens.element_size()
    fwd_bytes = op_batch * n * 4 + 2 * op_batch * k * d * e + op_batch * (k + n) * 8 + op_batch * n * 4
    bwd_bytes = op_batch * k * d * e + op_batch * n * 8 + op_batch * n * d * e
    if op_mode == "fwd":
        timed(lambda: fn(scores, k, tokens), nbytes=fwd_bytes)
    elif op_mode == "bwd":
        visible = fn(scores, k, tokens)[3]
        timed(lambda: torch.autograd.grad(visible, tokens, grad, retain_graph=True), nbytes=bwd_bytes)
    else:
        timed(lambda: torch.autograd.grad(fn(scores, k, tokens)[3], tokens, grad), nbytes=fwd_bytes + bwd_bytes)
