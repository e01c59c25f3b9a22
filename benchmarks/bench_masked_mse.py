"""masked_mse at the paper's shapes: B 64-256; audio = fbank [B, 416, 128] viewed as [B, 1, 128, 416]
(non-contiguous, 208 patches of 256), video = [B, 3, 224, 224] (196 patches of 768); norm_pix on;
75 % of the patches masked."""

from __future__ import annotations

import pytest
import torch

from tgdp import ops
from tgdp.reference.masked_mse import masked_mse as reference


def make_inputs(batch, modality, dtype, device):
    if modality == "audio":
        imgs = torch.randn(batch, 416, 128, device=device, dtype=dtype).transpose(1, 2).unsqueeze(1)
    else:
        imgs = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    b, c, h, w = imgs.shape
    n, dim = (h // 16) * (w // 16), 16 * 16 * c
    pred = torch.randn(b, n, dim, device=device, dtype=dtype, requires_grad=True)
    mask = (torch.rand(b, n, device=device) < 0.75).float()
    return pred, imgs, mask


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_masked_mse(timed, pick, device, op_batch, modality, op_dtype, op_mode, op_provider):
    pred, imgs, mask = make_inputs(op_batch, modality, op_dtype, device)
    fn = pick(op_provider, ops.masked_mse, reference)
    e = pred.element_size()
    fwd_bytes = pred.numel() * e + imgs.numel() * e + mask.numel() * 4
    bwd_bytes = fwd_bytes + pred.numel() * e
    if op_mode == "fwd":
        timed(lambda: fn(pred, imgs, mask, 16, True), nbytes=fwd_bytes)
    elif op_mode == "bwd":
        loss = fn(pred, imgs, mask, 16, True)
        timed(lambda: torch.autograd.grad(loss, pred, retain_graph=True), nbytes=bwd_bytes)
    else:
        timed(lambda: torch.autograd.grad(fn(pred, imgs, mask, 16, True), pred), nbytes=fwd_bytes + bwd_bytes)
