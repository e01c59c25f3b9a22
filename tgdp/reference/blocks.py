"""Reference transformer pieces with the official parameter names (spec §1.5, §8.1).

Every block is a pre-norm ViT block with three LayerNorm pairs: (norm1, norm2) for the unified mode
(``modality=None``), (norm1_a, norm2_a) for audio and (norm1_v, norm2_v) for video. Attention and MLP
weights are shared by the three modes. Attention is written out explicitly (no SDPA) so the
post-softmax map can be returned and so this file is the numerical ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PatchEmbed", "Attention", "Mlp", "Block", "init_weights", "init_patch_embed"]


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: img [B, C, H, W] -> tokens [B, (H/p)(W/p), D], row-major."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              bias=True, device=device, dtype=dtype)

    def forward(self, img: Tensor) -> Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear (bias, rows [q; k; v], head-major) and proj Linear."""

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, return_attn: bool = False):
        """x: [B, N, D] -> [B, N, D]; with ``return_attn`` also the post-softmax map [B, H, N, N]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # [B, H, N, hd] each
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # softmax over keys
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return (out, attn) if return_attn else out


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block ``x + attn(LN1(x))`` then ``x + mlp(LN2(x))``; the LN pair picked by ``modality``.

    Attribute order follows the official state dict (norm1, norm1_a, norm1_v, attn, norm2, ...).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=eps, **kw)
        self.norm1_a = nn.LayerNorm(dim, eps=eps, **kw)
        self.norm1_v = nn.LayerNorm(dim, eps=eps, **kw)
        self.attn = Attention(dim, num_heads, **kw)
        self.norm2 = nn.LayerNorm(dim, eps=eps, **kw)
        self.norm2_a = nn.LayerNorm(dim, eps=eps, **kw)
        self.norm2_v = nn.LayerNorm(dim, eps=eps, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)

    def norms(self, modality: str | None) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        if modality == "a":
            return self.norm1_a, self.norm2_a
        if modality == "v":
            return self.norm1_v, self.norm2_v
        if modality is None:
            return self.norm1, self.norm2
        raise ValueError(f"modality={modality!r} must be None, 'a' or 'v'")

    def forward(self, x: Tensor, modality: str | None = None, return_attn: bool = False):
        """x: [B, N, D] -> [B, N, D] (and the attention map [B, H, N, N] with ``return_attn``)."""
        n1, n2 = self.norms(modality)
        if return_attn:
            y, attn = self.attn(n1(x), return_attn=True)
        else:
            y, attn = self.attn(n1(x)), None
        x = x + y
        x = x + self.mlp(n2(x))
        return (x, attn) if return_attn else x


def init_weights(module: nn.Module) -> None:
    """Spec §1.9: Linear xavier-uniform / bias 0, LayerNorm 1 / 0 (use with ``Module.apply``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(pe: PatchEmbed) -> None:
    """xavier-uniform on the conv weight viewed as [D, C*p*p]; the bias keeps PyTorch's default init."""
    w = pe.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
