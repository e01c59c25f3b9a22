"""Fast CAV-MAE Sync: packed dual-path student, packed teacher, fused attention backends.

``FastCAVMAESync`` subclasses the reference :class:`tgdp.reference.model.CAVMAESync`: it owns the
same parameters under the same names (one state dict loads into both) and overrides only the
forwards. What changes:

- **One forward per modality encoder for both student views.** The reconstruction view
  ``[CLS, k_rec patches, R registers]`` and the contrastive view ``[CLS, k_con patches, R
  registers]`` of all B samples are packed into one ``[total, D]`` tensor: LayerNorm, qkv, proj
  and MLP run once on it (the big matmuls see ``2B`` sequences at once), attention runs per
  sequence (:func:`tgdp.model.attention.varlen_attention`).
- **One forward of the joint layer for its three passes**: unified on the rec audio+video visible
  patches, audio-LN on the con ``[CLS_a, patches]``, video-LN on the con ``[CLS_v, patches]``.
  Per-segment LayerNorm weights, one qkv / proj / MLP matmul.
- **No wasted passes**: the teacher skips the unified joint pass, the student runs the
  contrastive (a/v-LN) joint pass only on the contrastive view.
- **No explicit attention map**: SDPA / FlashAttention everywhere (decoder included); teacher
  scores come from :func:`tgdp.ops.patch_global_scores` on the joint layer's q, k and the softmax
  log-sum-exp the attention backend returns.
- **Static shapes**: every view length is fixed by the config (see :mod:`tgdp.model.packing`);
  :meth:`FastCAVMAESync.prepare_layouts` builds a batch size's layouts before a compiled forward.
- **Blocks are called as modules** (:class:`PackedBlock`, the reference ``Block`` plus a packed
  forward): FSDP2 shards each block as its own unit, so its all-gather / reduce-scatter overlap with
  the neighbouring blocks' compute (``tgdp.training.distributed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgdp import ops
from tgdp.configs import ModelConfig
from tgdp.masking import Masks
from tgdp.model.attention import VarlenMeta, resolve_backend, varlen_attention
from tgdp.model.packing import gather_rows, group_view, split_groups, view_layout
from tgdp.reference.blocks import Block
from tgdp.reference.model import CAVMAESync, StudentOutput, TeacherOutput
from tgdp.validate import check_masks

__all__ = ["FastCAVMAESync", "PackedBlock", "packed_block", "segment_layer_norm"]


def segment_layer_norm(x: Tensor, meta: VarlenMeta, norms: Sequence[nn.LayerNorm]) -> Tensor:
    """LayerNorm of packed rows with one (weight, bias) per segment group.

    x: [total, D]; norms: one LayerNorm per group of ``meta`` (runs of groups sharing a module are
    normalised in one call). Returns [total, D].
    """
    runs: list[tuple[int, int, nn.LayerNorm]] = []
    for g, ln in zip(meta.groups, norms, strict=True):
        if runs and runs[-1][2] is ln and runs[-1][1] == g.start:
            runs[-1] = (runs[-1][0], g.stop, ln)
        else:
            runs.append((g.start, g.stop, ln))
    if len(runs) == 1:
        return runs[0][2](x)
    return torch.cat([F.layer_norm(x[s:e], ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                      for s, e, ln in runs], 0)


def packed_block(blk: nn.Module, x: Tensor, meta: VarlenMeta, modalities: Sequence[str | None], *,
                 backend: str, return_qk: bool = False):
    """One pre-norm block over packed sequences (same maths as ``tgdp.reference.blocks.Block``).

    blk: a reference ``Block`` (its norm1*/attn/norm2*/mlp parameters are used, not its forward).
    x: [total, D] packed tokens; modalities: the LN mode (None / 'a' / 'v') of each group of ``meta``.
    Returns x [total, D]; with ``return_qk`` also (q [total, H, hd], k [total, H, hd],
    lse [H, total] or None) of this block's attention, for the teacher scores.
    """
    n1 = [blk.norms(m)[0] for m in modalities]
    n2 = [blk.norms(m)[1] for m in modalities]
    attn = blk.attn
    qkv = attn.qkv(segment_layer_norm(x, meta, n1)).unflatten(-1, (3, attn.num_heads, attn.head_dim))
    q, k, v = qkv.unbind(1)                                    # [total, H, hd] each
    o, lse = varlen_attention(q, k, v, meta, scale=attn.scale, backend=backend, return_lse=return_qk)
    x = x + attn.proj(o.flatten(1))
    x = x + blk.mlp(segment_layer_norm(x, meta, n2))
    return (x, (q, k, lse)) if return_qk else x


class PackedBlock(Block):
    """The reference :class:`Block` (same parameters, same names) with a packed forward.

    ``blk(x, packed=meta, modalities=..., backend=...)`` runs :func:`packed_block` on packed rows
    x [total, D]; without ``packed`` it is the reference ``Block.forward``. Calling the block as a
    module (rather than applying its weights functionally) is what lets FSDP2 hook it: each block is
    one FSDP unit, all-gathered just before its forward and resharded after it.
    """

    def forward(self, x: Tensor, *args, packed: VarlenMeta | None = None, modalities: Sequence[str | None] = (),
                backend: str = "sdpa", return_qk: bool = False, **kwargs):
        if packed is None:
            return super().forward(x, *args, **kwargs)
        return packed_block(self, x, packed, modalities, backend=backend, return_qk=return_qk)


def _pack_view(x: Tensor, cls: Tensor, regs: Tensor, ids_keep: Tensor | None) -> Tensor:
    """One view of a modality as packed rows: x [B, N, D] patch tokens, cls [1, 1, D], regs [R, D],
    ids_keep [B, k] or None (all patches in patch order) -> [B * (1 + k + R), D]."""
    b, _, d = x.shape
    if ids_keep is not None:
        x = gather_rows(x, ids_keep)
    seq = torch.cat([cls.expand(b, -1, -1), x, regs.unsqueeze(0).expand(b, -1, -1)], dim=1)
    return seq.flatten(0, 1)


class FastCAVMAESync(CAVMAESync):
    """Same parameters and protocol as :class:`CAVMAESync`; packed, map-free forwards.

    The attention backend (``cfg.attn_backend``) is resolved once per device on first use.
    """

    block_cls = PackedBlock

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__(cfg, device=device, dtype=dtype)
        self._backends: dict[str, str] = {}

    def attention_backend(self, device: torch.device) -> str:
        key = str(device)
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.cfg.attn_backend, device)
        return self._backends[key]

    def prepare_layouts(self, batch: int, rec_keep: tuple[int, int], con_keep: tuple[int, int],
                        device: torch.device | str) -> None:
        """Build (once; cached) every layout the forwards use at this batch size: student views with
        ``rec_keep`` / ``con_keep`` visible patches (audio, video), the teacher's and feature
        extraction's full views, the joint passes and the decoder. Call before a compiled forward
        so the traced graph reads the cached ``cu_seqlens`` (the forwards build exactly these keys:
        tests/test_hot_path.py)."""
        self.attention_backend(torch.device(device))   # resolved eagerly too (a constant once traced)
        c, r = self.cfg, self.cfg.num_register_tokens
        na, nv = c.num_patches_a, c.num_patches_v
        (ra, rv), (ca, cv) = rec_keep, con_keep
        for views in ([(batch, 1 + ra + r), (batch, 1 + ca + r)], [(batch, 1 + rv + r), (batch, 1 + cv + r)],
                      [(batch, ra + rv), (batch, 1 + ca), (batch, 1 + cv)], [(batch, na + nv)],
                      [(batch, 1 + na + r)], [(batch, 1 + nv + r)], [(batch, 1 + na), (batch, 1 + nv)]):
            view_layout(views, device)

    # ------------------------------------------------------------------ packed pieces

    def _blocks(self, blocks, x: Tensor, meta, modalities, backend: str) -> Tensor:
        for blk in blocks:
            x = blk(x, packed=meta, modalities=modalities, backend=backend)
        return x

    def _encode_views(self, a: Tensor, v: Tensor, views_a, views_v, backend: str):
        """Modality-specific blocks, all views of a modality in ONE packed forward.

        a [B, Na, D], v [B, Nv, D]; views_*: list of (ids_keep [B, k] | None, detach_cls).
        Returns per modality a list of [B, 1 + k, D] per view (CLS first, registers dropped).
        """
        r = self.cfg.num_register_tokens
        out = []
        for x, views, cls, regs, blocks in ((a, views_a, self.cls_token_a, self.register_tokens[:r], self.blocks_a),
                                            (v, views_v, self.cls_token_v, self.register_tokens[r:], self.blocks_v)):
            b, n = x.shape[:2]
            lengths = [1 + (n if ids is None else ids.shape[1]) + r for ids, _ in views]
            meta = view_layout([(b, length) for length in lengths], x.device)
            packed = torch.cat([_pack_view(x, cls.detach() if det else cls, regs, ids) for ids, det in views], 0)
            packed = self._blocks(blocks, packed, meta, [None] * len(views), backend)
            out.append([seq[:, : seq.shape[1] - r] for seq in split_groups(packed, meta)])
        return out[0], out[1]

    def _joint(self, segments: list[Tensor], modalities, backend: str, return_qk: bool = False):
        """Joint blocks (chained, as in the reference) over segments [B, L_i, D] packed in one forward,
        each with its LN mode. Returns the segments [B, L_i, D] (and the last block's q, k, lse, meta)."""
        b = segments[0].shape[0]
        meta = view_layout([(b, s.shape[1]) for s in segments], segments[0].device)
        x = torch.cat([s.flatten(0, 1) for s in segments], 0)
        qk = None
        last = len(self.blocks_u) - 1
        for i, blk in enumerate(self.blocks_u):
            if return_qk and i == last:
                x, qk = blk(x, packed=meta, modalities=modalities, backend=backend, return_qk=True)
            else:
                x = blk(x, packed=meta, modalities=modalities, backend=backend)
        return split_groups(x, meta), qk, meta

    def decode(self, x: Tensor, masks: tuple[Masks, Masks]) -> tuple[Tensor, Tensor]:
        """latent x [B, ka+kv, D] -> pred_a [B, Na, p*p], pred_v [B, Nv, p*p*C] (reference maths,
        fused attention: every decoder sequence is Na + Nv long, one segment group)."""
        ma, mv = masks
        na, nv = self.cfg.num_patches_a, self.cfg.num_patches_v
        x = self.decoder_embed(x)
        b, _, dd = x.shape
        ka = ma.num_keep
        halves = []
        for part, m, n in ((x[:, :ka], ma, na), (x[:, ka:], mv, nv)):
            part = torch.cat([part, self.mask_token.expand(b, n - part.shape[1], -1)], dim=1)
            halves.append(gather_rows(part, m.ids_restore))
        x = torch.cat(halves, dim=1)
        pos = torch.cat([self.decoder_pos_embed_a + self.decoder_modality_a,
                         self.decoder_pos_embed_v + self.decoder_modality_v], dim=1)
        x = (x + pos).flatten(0, 1)
        meta = view_layout([(b, na + nv)], x.device)
        x = self._blocks(self.decoder_blocks, x, meta, [None], self.attention_backend(x.device))
        x = self.decoder_norm(x).unflatten(0, (b, na + nv))
        return self.decoder_pred_a(x[:, :na]), self.decoder_pred_v(x[:, na:])

    # ------------------------------------------------------------------ protocol

    def student_forward(self, audio: Tensor, frames: Tensor, rec: tuple[Masks, Masks],
                        con: tuple[Masks, Masks], *, rec_grad_to_cls: bool = False,
                        schedule: str = "fast") -> StudentOutput:
        """Both views in one packed forward per modality encoder and one packed joint forward.

        audio [B, T, F], frames [B, C, S, S]; rec/con: (audio Masks, video Masks).
        Returns pred_a [B, Na, p*p], pred_v [B, Nv, p*p*C] (rec view), cls_a, cls_v [B, D] (con view).
        """
        self._check_fast(audio, frames, schedule)
        b = audio.shape[0]
        for name, (ma, mv) in (("rec", rec), ("con", con)):
            check_masks(ma, b, self.cfg.num_patches_a, f"{name}[0]")
            check_masks(mv, b, self.cfg.num_patches_v, f"{name}[1]")
        be = self.attention_backend(audio.device)
        a, v = self.embed(audio, frames)
        # The rec view's CLS is detached unless rec_grad_to_cls (same as the reference).
        (ra, ca), (rv, cv) = self._encode_views(
            a, v, [(rec[0].ids_keep, not rec_grad_to_cls), (con[0].ids_keep, False)],
            [(rec[1].ids_keep, not rec_grad_to_cls), (con[1].ids_keep, False)], be)
        # Joint layer, three passes in one packed forward: unified on the rec patches (no CLS),
        # audio-LN on the con audio [CLS, patches], video-LN on the con video [CLS, patches].
        (u, ja, jv), _, _ = self._joint([torch.cat([ra[:, 1:], rv[:, 1:]], 1), ca, cv], (None, "a", "v"), be)
        pred_a, pred_v = self.decode(self.norm(u), rec)
        return StudentOutput(pred_a, pred_v, self.norm_a(ja[:, 0]), self.norm_v(jv[:, 0]))

    def student_forward_single(self, audio: Tensor, frames: Tensor, rec: tuple[Masks, Masks], *,
                               schedule: str = "fast") -> StudentOutput:
        """CAV-MAE Sync's single pass (reference: :meth:`CAVMAESync.student_forward_single`): one
        packed encoder forward of the ``rec`` view (CLS not detached), one packed joint forward for
        its three passes (unified -> decoder, audio-LN and video-LN -> cls_a, cls_v)."""
        self._check_fast(audio, frames, schedule)
        b = audio.shape[0]
        check_masks(rec[0], b, self.cfg.num_patches_a, "rec[0]")
        check_masks(rec[1], b, self.cfg.num_patches_v, "rec[1]")
        be = self.attention_backend(audio.device)
        a, v = self.embed(audio, frames)
        ([ra], [rv]) = self._encode_views(a, v, [(rec[0].ids_keep, False)], [(rec[1].ids_keep, False)], be)
        (u, ja, jv), _, _ = self._joint([torch.cat([ra[:, 1:], rv[:, 1:]], 1), ra, rv], (None, "a", "v"), be)
        pred_a, pred_v = self.decode(self.norm(u), rec)
        return StudentOutput(pred_a, pred_v, self.norm_a(ja[:, 0]), self.norm_v(jv[:, 0]))

    def teacher_forward(self, audio: Tensor, frames: Tensor, *, direction: str = "patch_to_cls",
                        renormalize: bool = True, schedule: str = "fast") -> TeacherOutput:
        """Full unshuffled view; no unified joint pass. scores_a [B, Na], scores_v [B, Nv] fp32 from
        :func:`tgdp.ops.patch_global_scores` on the last joint layer's q, k and softmax lse."""
        self._check_fast(audio, frames, schedule)
        if direction not in ("patch_to_cls", "cls_to_patch"):
            raise ValueError(f"direction={direction!r} must be 'patch_to_cls' or 'cls_to_patch'")
        be = self.attention_backend(audio.device)
        a, v = self.embed(audio, frames)
        ([sa], [sv]) = self._encode_views(a, v, [(None, False)], [(None, False)], be)
        (ja, jv), (q, k, lse), meta = self._joint([sa, sv], ("a", "v"), be, return_qk=True)
        scale = self.blocks_u[-1].attn.scale
        scores = []
        for g in meta.groups:
            qg = group_view(q, g).transpose(1, 2)      # [B, H, L, hd]
            kg = group_view(k, g).transpose(1, 2)
            lg = None if lse is None else lse[:, g.start:g.stop].unflatten(1, (g.count, g.length)).transpose(0, 1)
            scores.append(ops.patch_global_scores(qg, kg, lg, scale=scale, direction=direction,
                                                  renormalize=renormalize))
        return TeacherOutput(scores[0], scores[1], self.norm_a(ja[:, 0]), self.norm_v(jv[:, 0]))

    def extract_features(self, audio: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Retrieval globals on the full view: cls_a, cls_v [B, D] (norm_a / norm_v, not L2)."""
        self._check_fast(audio, frames, "fast")
        be = self.attention_backend(audio.device)
        a, v = self.embed(audio, frames)
        ([sa], [sv]) = self._encode_views(a, v, [(None, False)], [(None, False)], be)
        (ja, jv), _, _ = self._joint([sa, sv], ("a", "v"), be)
        return self.norm_a(ja[:, 0]), self.norm_v(jv[:, 0])

    def _check_fast(self, audio: Tensor, frames: Tensor, schedule: str) -> None:
        self._check(audio, frames, schedule)
        if schedule != "fast":
            raise ValueError(f"schedule={schedule!r}: the fast model runs no wasted passes; "
                             "use the reference CAVMAESync to count the official schedule")
