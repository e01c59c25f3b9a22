"""Per-frame features of a frozen encoder for the probe heads (:mod:`tgdp.eval.probe_heads`).

What each head reads, per (frame, audio window) row of a clip:

- ``official``, modality "both" (the released ``CAVMAEFT.forward(mode='multimodal')``): CLS_a and
  CLS_v **after the modality-specific blocks**, registers dropped, **no final LayerNorm**; the joint
  layer's output is not used (the head concatenates the two into one 2D-wide token per frame).
- ``official``, "audio" / "video" (``mode='audioonly'`` / ``'videoonly'``): the modality's
  ``[CLS, patches]`` (registers dropped) through the joint block(s) with the *unified* LayerNorms,
  then ``norm``, averaged over all tokens.
- ``tokens``: the retrieval globals (``extract_features``: joint layer in a/v-LN mode, ``norm_a`` /
  ``norm_v`` of the CLS).

Works with every encoder that has the reference model's pieces (``embed``, ``encode_specific``,
``blocks_u``, ``norm``): :class:`tgdp.reference.model.CAVMAESync` and the fast model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ProbeFeatures"]


class ProbeFeatures(nn.Module):
    """Wraps a frozen encoder; ``extract_features(audio, frames)`` -> (a, v) ``[B, D]`` each, the
    features ``head`` / ``modality`` read (drop-in for :func:`tgdp.eval.common.extract_video_features`)."""

    def __init__(self, encoder: nn.Module, head: str, modality: str = "both"):
        super().__init__()
        if head not in ("official", "tokens"):
            raise ValueError(f"probe.head={head!r} must be 'official' or 'tokens'")
        if modality not in ("both", "audio", "video"):
            raise ValueError(f"probe.modality={modality!r} must be 'both', 'audio' or 'video'")
        self.encoder, self.head, self.modality = encoder, head, modality

    @torch.no_grad()
    def extract_features(self, audio: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """audio [B, T_a, F], frames [B, C, S, S] -> a, v [B, D] (fp32 or the autocast dtype)."""
        enc = self.encoder
        if self.head == "tokens":
            return enc.extract_features(audio, frames)
        enc._check(audio, frames, "fast")     # the encoder's shape check (metadata only, no sync)
        sa, sv = enc.encode_specific(*enc.embed(audio, frames), None)   # [B, 1+N, D], CLS first
        if self.modality == "both":
            return sa[:, 0], sv[:, 0]
        return self._unified_mean(sa), self._unified_mean(sv)

    def _unified_mean(self, x: Tensor) -> Tensor:
        for blk in self.encoder.blocks_u:     # chained, unified LNs (CAVMAEFT audioonly / videoonly)
            x = blk(x)
        return self.encoder.norm(x).mean(dim=1)
