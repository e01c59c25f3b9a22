"""The two attention-probe heads on frozen per-frame features (``probe.head``).

``official`` — :class:`OfficialProbeHead`, the released model file's ``CAVMAEFT`` with
``aggregate='self_attention_cls'`` (TG-DP ``src/models/cavmae_dp.py``), the paper's "two-layer
classification head" (supplement §1.4): one token per frame (T = 16), a learnable ``cls_cls_token``
prepended, 2 pre-norm ViT blocks (qkv bias, MLP ratio 4, 12 heads, LayerNorm eps 1e-5, unified LNs),
``classifier_norm`` on every token, ``classifier_head`` (Linear) on the prepended token. No frame or
position embedding (the released one is commented out), no input standardisation. Init: the token
normal(std 0.02), every Linear xavier-uniform with zero bias, LayerNorms (1, 0). Its per-frame inputs
(:mod:`tgdp.eval.probe_features`): multimodal = concat(CLS_a, CLS_v), width 2D; audio- or video-only =
that modality's width-D feature.

``tokens`` — :class:`TokenProbeHead`, our earlier head: 2T tokens of width D (one per frame and
modality) with learned modality and frame embeddings, per-dimension standardisation with
training-set statistics, a learnable CLS, a 2-layer pre-norm ``nn.TransformerEncoder``, LayerNorm,
linear head; fed the retrieval globals (after the joint layer, ``norm_a`` / ``norm_v``).

Both: ``forward(a, v)`` with a, v ``[B, T, D]`` (the unused one may be None for a unimodal head) ->
logits ``[B, C]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tgdp.reference.blocks import Block, init_weights

__all__ = ["OfficialProbeHead", "TokenProbeHead", "build_head"]

_MODS = {"both": ("audio", "video"), "audio": ("audio",), "video": ("video",)}


def _inputs(a: Tensor | None, v: Tensor | None, mods: tuple[str, ...], num_frames: int) -> list[Tensor]:
    given = {"audio": a, "video": v}
    out = []
    for m in mods:
        x = given[m]
        if x is None or x.ndim != 3 or x.shape[1] != num_frames:
            shape = None if x is None else tuple(x.shape)
            raise ValueError(f"{m} input must be [B, {num_frames}, D], got {shape}")
        out.append(x)
    return out


class OfficialProbeHead(nn.Module):
    """CAVMAEFT 'self_attention_cls' (official parameter names: cls_cls_token, classifier_layers,
    classifier_norm, classifier_head). ``dim`` is the encoder width D; the head is 2D wide when
    ``modality`` is "both"."""

    def __init__(self, dim: int, num_classes: int, num_frames: int = 16, modality: str = "both",
                 depth: int = 2, num_heads: int = 12, mlp_ratio: float = 4.0, ln_eps: float = 1e-5):
        super().__init__()
        if modality not in _MODS:
            raise ValueError(f"modality={modality!r} must be one of {sorted(_MODS)}")
        self.mods, self.num_frames = _MODS[modality], num_frames
        width = dim * len(self.mods)
        if width % num_heads:
            raise ValueError(f"probe width={width} (dim={dim} x {len(self.mods)} modalities) must be "
                             f"divisible by num_heads={num_heads}")
        if num_classes < 1 or num_frames < 1:
            raise ValueError(f"num_classes={num_classes} and num_frames={num_frames} must be >= 1")
        self.cls_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.classifier_layers = nn.ModuleList(Block(width, num_heads, mlp_ratio, ln_eps) for _ in range(depth))
        self.classifier_norm = nn.LayerNorm(width, eps=ln_eps)
        self.classifier_head = nn.Linear(width, num_classes)
        nn.init.normal_(self.cls_cls_token, std=0.02)
        self.apply(init_weights)

    def forward(self, a: Tensor | None, v: Tensor | None) -> Tensor:
        x = torch.cat(_inputs(a, v, self.mods, self.num_frames), dim=-1)      # [B, T, W]
        x = torch.cat([self.cls_cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+T, W]
        for blk in self.classifier_layers:
            x = blk(x)
        return self.classifier_head(self.classifier_norm(x)[:, 0])


class TokenProbeHead(nn.Module):
    """CLS + per-(frame, modality) tokens with modality and frame embeddings -> 2-layer transformer."""

    def __init__(self, dim: int, num_classes: int, num_frames: int = 16, modality: str = "both",
                 depth: int = 2, num_heads: int = 12, mlp_ratio: float = 4.0):
        super().__init__()
        if modality not in _MODS:
            raise ValueError(f"modality={modality!r} must be one of {sorted(_MODS)}")
        if dim % num_heads:
            raise ValueError(f"probe dim={dim} must be divisible by num_heads={num_heads}")
        if num_classes < 1 or num_frames < 1:
            raise ValueError(f"num_classes={num_classes} and num_frames={num_frames} must be >= 1")
        self.mods, self.num_frames = _MODS[modality], num_frames
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.mod_embed = nn.Parameter(torch.zeros(len(self.mods), 1, dim))
        self.frame_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        for p in (self.cls, self.mod_embed, self.frame_embed):
            nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        # Per-dimension standardisation with training-set statistics (set_input_stats), like the
        # affine-free BatchNorm in front of MAE's linear probe.
        self.register_buffer("in_mean", torch.zeros(len(self.mods), dim))
        self.register_buffer("in_std", torch.ones(len(self.mods), dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def set_input_stats(self, a: Tensor | None, v: Tensor | None, eps: float = 1e-6) -> None:
        """Per-dimension mean / std over (videos, frames) of the training features a, v: [N, T, D]."""
        for i, x in enumerate(_inputs(a, v, self.mods, self.num_frames)):
            x = x.reshape(-1, x.shape[-1]).float()
            self.in_mean[i] = x.mean(0)
            self.in_std[i] = x.std(0, unbiased=False) + eps

    def forward(self, a: Tensor | None, v: Tensor | None) -> Tensor:
        seqs = [(x - self.in_mean[i]) / self.in_std[i] + self.mod_embed[i] + self.frame_embed
                for i, x in enumerate(_inputs(a, v, self.mods, self.num_frames))]
        x = torch.cat(seqs, dim=1)                                      # [B, M*T, D]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)   # [B, 1+M*T, D]
        return self.head(self.norm(self.blocks(x))[:, 0])


def build_head(head: str, dim: int, num_classes: int, num_frames: int, modality: str, depth: int,
               num_heads: int) -> nn.Module:
    """``probe.head`` -> a freshly initialised head (uses the global RNG: fork it to be reproducible)."""
    if head == "official":
        return OfficialProbeHead(dim, num_classes, num_frames, modality, depth, num_heads)
    if head == "tokens":
        return TokenProbeHead(dim, num_classes, num_frames, modality, depth, num_heads)
    raise ValueError(f"probe.head={head!r} must be 'official' or 'tokens'")
