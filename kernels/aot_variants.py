"""The calls of every ``tgdp.ops`` kernel that ``tgdp.kernels.aot`` compiles: paper() shapes, the
tensor layouts the model passes, fp32 / bf16 / fp16 and every variant flag, forward and backward.

Inputs are ``torch.empty`` CPU tensors: under ``tgdp.kernels.aot.compiling_for`` nothing runs, so
only their shapes, strides, dtypes and alignment matter (and the untouched pages cost no memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tgdp.configs import paper
from tgdp.masking import num_keep
from tgdp.patching import audio_as_image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str                            # "<op>/<modality>/<dtypes>/<flags>"
    run: Callable[[], None]              # calls the op's Triton twin (and its backward)


def _teacher_qk_lse(b: int, lengths: tuple[int, ...], heads: int, head_dim: int, dtype: torch.dtype):
    """q, k [B, H, L, d] and lse [B, H, L] per group, as the fast model's joint layer hands them to
    patch_global_scores: views of one packed qkv [total, 3, H, d] and one lse [H, total]."""
    total = b * sum(lengths)
    qkv = torch.empty(total, 3, heads, head_dim, dtype=dtype)
    q, k, _ = qkv.unbind(1)
    lse = torch.empty(heads, total)
    groups, start = [], 0
    for length in lengths:
        stop = start + b * length
        qg, kg = (x[start:stop].unflatten(0, (b, length)).transpose(1, 2) for x in (q, k))
        groups.append((qg, kg, lse[:, start:stop].unflatten(1, (b, length)).transpose(0, 1)))
        start = stop
    return groups


def paper_variants(batch: int = 256) -> list[Variant]:
    from tgdp.kernels import masked_mse as mse
    from tgdp.kernels import patch_global_scores as pgs
    from tgdp.kernels import topk_visible as topk

    cfg = paper()
    m = cfg.model
    heads, head_dim = m.num_heads, m.embed_dim // m.num_heads
    n = {"audio": m.num_patches_a, "video": m.num_patches_v}
    variants: list[Variant] = []

    # Teacher scores: both directions, with lse (FlashAttention) and without (online softmax).
    for dn, dt in DTYPES.items():
        groups = dict(zip(n, _teacher_qk_lse(batch, (1 + n["audio"], 1 + n["video"]), heads, head_dim, dt)))
        for mod, (q, k, lse) in groups.items():
            for direction in ("patch_to_cls", "cls_to_patch"):
                for with_lse in (False, True):
                    def run(q=q, k=k, lse=lse if with_lse else None, direction=direction):
                        pgs.patch_global_scores(q, k, lse, scale=head_dim ** -0.5, direction=direction,
                                                renormalize=cfg.masking.renormalize_scores)
                    variants.append(Variant(f"patch_global_scores/{mod}/{dn}/{direction}/"
                                            f"{'lse' if with_lse else 'no-lse'}", run))

    # Masking at both mask ratios (k is a runtime argument: one cubin), the row gather + its backward.
    for dn, dt in DTYPES.items():
        for mod, nn in n.items():
            ks = [num_keep(nn, r) for r in (cfg.masking.rec_ratio, cfg.masking.con_ratio)]

            def run(nn=nn, ks=ks, dt=dt):
                for k in ks:
                    tokens = torch.empty(batch, nn, m.embed_dim, dtype=dt, requires_grad=True)
                    *_, visible = topk.topk_visible(torch.empty(batch, nn, dtype=dt), k, tokens)
                    visible.backward(torch.empty_like(visible))
            variants.append(Variant(f"topk_visible/{mod}/{dn}/k={','.join(map(str, ks))}", run))

    # Reconstruction loss, forward + backward: pred and image in one dtype, pred in low precision
    # with the fp32 image (bf16 autocast), the bool mask; the audio image is the fbank's
    # transposed view, the video frames are contiguous.
    images = {"audio": lambda dt: audio_as_image(torch.empty(batch, m.audio_length, m.n_mels, dtype=dt)),
              "video": lambda dt: torch.empty(batch, m.in_chans, m.img_size, m.img_size, dtype=dt)}
    combos = [(dn, dn, "f32mask") for dn in DTYPES]
    combos += [("bf16", "fp32", "f32mask"), ("fp16", "fp32", "f32mask"), ("fp32", "fp32", "boolmask")]
    for pred_dn, img_dn, mask_kind in combos:
        for mod, make_image in images.items():
            for norm_pix in (False, True):
                def run(pred_dt=DTYPES[pred_dn], img_dt=DTYPES[img_dn], make_image=make_image, mod=mod,
                        norm_pix=norm_pix, mask_dt=torch.bool if mask_kind == "boolmask" else torch.float32):
                    imgs = make_image(img_dt)
                    p_dim = m.patch_size ** 2 * imgs.shape[1]
                    pred = torch.empty(batch, n[mod], p_dim, dtype=pred_dt, requires_grad=True)
                    mask = torch.zeros(batch, n[mod], dtype=mask_dt)
                    mse.masked_mse(pred, imgs, mask, m.patch_size, norm_pix).backward()
                variants.append(Variant(f"masked_mse/{mod}/pred={pred_dn},img={img_dn},{mask_kind}/"
                                        f"{'norm_pix' if norm_pix else 'plain'}", run))
    return variants
