"""Reference CAV-MAE Sync / TG-DP model in plain PyTorch (spec §1), official parameter names.

Sequence per modality branch: ``[CLS, visible patches (in keep order), R registers]``; CLS and
registers get no position or modality embedding. The registers are dropped before the joint layer(s),
which run three ways: unified on the concatenated visible patches (no CLS) -> ``norm`` -> decoder,
and on ``[CLS, patches]`` with the audio LNs / video LNs -> ``norm_a`` / ``norm_v`` of the CLS.
Differences from the official code (bugs, fixed): several joint layers are chained in the a/v passes;
the decoder takes the visible count from the Masks (not from sample 0); batch size 1 works; the
reconstruction pass prepends *detached* CLS tokens unless ``rec_grad_to_cls``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tgdp.configs import ModelConfig
from tgdp.masking import Masks
from tgdp.patching import audio_as_image
from tgdp.reference.blocks import Block, PatchEmbed, init_patch_embed, init_weights
from tgdp.reference.pos_embed import sincos_2d
from tgdp.validate import check_inputs, check_masks

__all__ = ["CAVMAESync", "StudentOutput", "TeacherOutput"]


@dataclass(frozen=True)
class StudentOutput:
    """pred_a [B, Na, p*p], pred_v [B, Nv, p*p*C] (reconstruction view); cls_a, cls_v [B, D] (contrastive view)."""

    pred_a: Tensor
    pred_v: Tensor
    cls_a: Tensor
    cls_v: Tensor


@dataclass(frozen=True)
class TeacherOutput:
    """scores_a [B, Na], scores_v [B, Nv] fp32 in patch-index order; cls_a, cls_v [B, D] (norm_a/norm_v)."""

    scores_a: Tensor
    scores_v: Tensor
    cls_a: Tensor
    cls_v: Tensor


_SCHEDULES = ("fast", "official")


class CAVMAESync(nn.Module):
    """CAV-MAE Sync with CLS + registers (the TG-DP backbone). All geometry comes from ``cfg``."""

    block_cls = Block   # subclasses may add forwards (the fast model's packed one); same parameters

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        d, dd, r = cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_register_tokens
        (fa, ta), (hv, wv) = cfg.audio_grid, cfg.video_grid

        self.modality_a = nn.Parameter(torch.empty(1, 1, d, **kw))
        self.modality_v = nn.Parameter(torch.empty(1, 1, d, **kw))
        # Fixed sin-cos tables, persistent buffers with the official names (frozen in the official model).
        self.register_buffer("pos_embed_a", self._table(d, fa, ta, device, dtype))
        self.register_buffer("pos_embed_v", self._table(d, hv, wv, device, dtype))
        self.register_tokens = nn.Parameter(torch.empty(2 * r, d, **kw))  # rows [0, R) audio, [R, 2R) video
        self.cls_token_a = nn.Parameter(torch.empty(1, 1, d, **kw))
        self.cls_token_v = nn.Parameter(torch.empty(1, 1, d, **kw))
        self.patch_embed_a = PatchEmbed(1, d, cfg.patch_size, **kw)
        self.patch_embed_v = PatchEmbed(cfg.in_chans, d, cfg.patch_size, **kw)

        def blocks(n: int, dim: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(self.block_cls(dim, heads, cfg.mlp_ratio, cfg.ln_eps, **kw) for _ in range(n))

        self.blocks_a = blocks(cfg.modality_specific_depth, d, cfg.num_heads)
        self.blocks_v = blocks(cfg.modality_specific_depth, d, cfg.num_heads)
        self.blocks_u = blocks(cfg.joint_depth, d, cfg.num_heads)
        self.norm_a = nn.LayerNorm(d, eps=cfg.ln_eps, **kw)
        self.norm_v = nn.LayerNorm(d, eps=cfg.ln_eps, **kw)
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps, **kw)

        self.decoder_embed = nn.Linear(d, dd, **kw)
        self.mask_token = nn.Parameter(torch.empty(1, 1, dd, **kw))
        self.decoder_modality_a = nn.Parameter(torch.empty(1, 1, dd, **kw))
        self.decoder_modality_v = nn.Parameter(torch.empty(1, 1, dd, **kw))
        self.register_buffer("decoder_pos_embed_a", self._table(dd, fa, ta, device, dtype))
        self.register_buffer("decoder_pos_embed_v", self._table(dd, hv, wv, device, dtype))
        self.decoder_blocks = blocks(cfg.decoder_depth, dd, cfg.decoder_num_heads)
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.ln_eps, **kw)
        self.decoder_pred_a = nn.Linear(dd, cfg.patch_dim_a, **kw)
        self.decoder_pred_v = nn.Linear(dd, cfg.patch_dim_v, **kw)
        if not self.cls_token_a.is_meta:  # meta builds (counting, key lists) have no values to initialise
            self.reset_parameters()

    @staticmethod
    def _table(dim: int, rows: int, cols: int, device, dtype) -> Tensor:
        t = torch.from_numpy(sincos_2d(dim, rows, cols)).unsqueeze(0)
        return t.to(device=device, dtype=dtype or torch.get_default_dtype())

    def reset_parameters(self) -> None:
        """Spec §1.9 (the pos tables are fixed and untouched)."""
        init_patch_embed(self.patch_embed_a)
        init_patch_embed(self.patch_embed_v)
        for p in (self.modality_a, self.modality_v, self.decoder_modality_a, self.decoder_modality_v,
                  self.mask_token, self.cls_token_a, self.cls_token_v):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.register_tokens, std=1.0)
        self.apply(init_weights)

    # ------------------------------------------------------------------ pieces

    def embed(self, audio: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """audio [B, T, F], frames [B, C, S, S] -> patch tokens a [B, Na, D], v [B, Nv, D]
        with pos + modality embeddings (before masking). Audio token = f * (T/p) + t."""
        a = self.patch_embed_a(audio_as_image(audio)) + self.pos_embed_a + self.modality_a
        v = self.patch_embed_v(frames) + self.pos_embed_v + self.modality_v
        return a, v

    def encode_specific(self, a: Tensor, v: Tensor, masks: tuple[Masks, Masks] | None,
                        detach_cls: bool = False) -> tuple[Tensor, Tensor]:
        """Modality-specific blocks. a [B, Na, D], v [B, Nv, D] -> [B, 1+ka, D], [B, 1+kv, D]
        (CLS first, registers already dropped). ``masks`` None = all patches in patch order."""
        r = self.cfg.num_register_tokens
        outs = []
        for x, m, cls, reg, blocks in (
            (a, None if masks is None else masks[0], self.cls_token_a, self.register_tokens[:r], self.blocks_a),
            (v, None if masks is None else masks[1], self.cls_token_v, self.register_tokens[r:], self.blocks_v),
        ):
            b, _, d = x.shape
            if m is not None:
                x = torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, d))
            cls = cls.detach() if detach_cls else cls
            x = torch.cat([cls.expand(b, -1, -1), x, reg.unsqueeze(0).expand(b, -1, -1)], dim=1)
            for blk in blocks:
                x = blk(x)
            outs.append(x[:, : x.shape[1] - r])
        return outs[0], outs[1]

    def joint_unified(self, a: Tensor, v: Tensor) -> Tensor:
        """a [B, 1+ka, D], v [B, 1+kv, D] -> latent [B, ka+kv, D]: joint blocks on the patches only, then ``norm``."""
        x = torch.cat([a[:, 1:], v[:, 1:]], dim=1)
        for blk in self.blocks_u:
            x = blk(x)
        return self.norm(x)

    def joint_modal(self, x: Tensor, modality: str, return_attn: bool = False):
        """x [B, 1+k, D] -> CLS embedding [B, D] (norm_a / norm_v) and, with ``return_attn``, the
        post-softmax map [B, H, 1+k, 1+k] of the last joint layer. The joint layers are chained."""
        attn = None
        last = len(self.blocks_u) - 1
        for i, blk in enumerate(self.blocks_u):
            if return_attn and i == last:
                x, attn = blk(x, modality, return_attn=True)
            else:
                x = blk(x, modality)
        norm = self.norm_a if modality == "a" else self.norm_v
        cls = norm(x[:, 0])
        return (cls, attn) if return_attn else cls

    def decode(self, x: Tensor, masks: tuple[Masks, Masks]) -> tuple[Tensor, Tensor]:
        """latent x [B, ka+kv, D] -> pred_a [B, Na, p*p], pred_v [B, Nv, p*p*C]."""
        ma, mv = masks
        na, nv = self.cfg.num_patches_a, self.cfg.num_patches_v
        x = self.decoder_embed(x)
        b, _, dd = x.shape
        ka = ma.num_keep  # every row of a Masks keeps the same count (not read from sample 0's mask)
        halves = []
        for part, m, n in ((x[:, :ka], ma, na), (x[:, ka:], mv, nv)):
            part = torch.cat([part, self.mask_token.expand(b, n - part.shape[1], -1)], dim=1)
            halves.append(torch.gather(part, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, dd)))
        x = torch.cat(halves, dim=1)
        x = x + torch.cat([self.decoder_pos_embed_a, self.decoder_pos_embed_v], dim=1)
        x = torch.cat([x[:, :na] + self.decoder_modality_a, x[:, na:] + self.decoder_modality_v], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, :na]), self.decoder_pred_v(x[:, na:])

    # ------------------------------------------------------------------ protocol

    def student_forward(self, audio: Tensor, frames: Tensor, rec: tuple[Masks, Masks],
                        con: tuple[Masks, Masks], *, rec_grad_to_cls: bool = False,
                        schedule: str = "fast") -> StudentOutput:
        """Two plain encoder passes: ``rec`` view -> decoder predictions; ``con`` view -> CLS globals.

        schedule "official" also runs (and discards) the rec view's a/v joint passes and the con
        view's unified joint pass, as the official dual path does; only for counting FLOPs.
        """
        self._check(audio, frames, schedule)
        b = audio.shape[0]
        for name, (ma, mv) in (("rec", rec), ("con", con)):
            check_masks(ma, b, self.cfg.num_patches_a, f"{name}[0]")
            check_masks(mv, b, self.cfg.num_patches_v, f"{name}[1]")
        a, v = self.embed(audio, frames)
        ra, rv = self.encode_specific(a, v, rec, detach_cls=not rec_grad_to_cls)
        pred_a, pred_v = self.decode(self.joint_unified(ra, rv), rec)
        if schedule == "official":
            self.joint_modal(ra, "a"), self.joint_modal(rv, "v")
        ca, cv = self.encode_specific(a, v, con)
        if schedule == "official":
            self.joint_unified(ca, cv)
        return StudentOutput(pred_a, pred_v, self.joint_modal(ca, "a"), self.joint_modal(cv, "v"))

    def student_forward_single(self, audio: Tensor, frames: Tensor, rec: tuple[Masks, Masks], *,
                               schedule: str = "fast") -> StudentOutput:
        """CAV-MAE Sync's single pass: ONE encoder pass on the ``rec`` view feeds both the decoder
        (unified joint pass) and the contrastive globals (a/v joint passes on the same visible tokens).

        The CLS tokens are not detached (they are the contrastive globals), so the reconstruction
        loss reaches them through attention, as in the official Sync code. Returns the same
        :class:`StudentOutput` as :meth:`student_forward`, with cls_a, cls_v from the ``rec`` view.
        The official schedule has no wasted pass here; ``schedule`` is only checked.
        """
        self._check(audio, frames, schedule)
        b = audio.shape[0]
        check_masks(rec[0], b, self.cfg.num_patches_a, "rec[0]")
        check_masks(rec[1], b, self.cfg.num_patches_v, "rec[1]")
        a, v = self.embed(audio, frames)
        ra, rv = self.encode_specific(a, v, rec)
        pred_a, pred_v = self.decode(self.joint_unified(ra, rv), rec)
        return StudentOutput(pred_a, pred_v, self.joint_modal(ra, "a"), self.joint_modal(rv, "v"))

    def teacher_forward(self, audio: Tensor, frames: Tensor, *, direction: str = "patch_to_cls",
                        renormalize: bool = True, schedule: str = "fast") -> TeacherOutput:
        """Full, unshuffled view. scores = head mean of the last joint layer's post-softmax map in
        a/v-LN mode: patch->CLS ``attn[:, :, 1:, 0]`` or CLS->patch ``attn[:, :, 0, 1:]``, fp32,
        optionally divided by the sum over patches. schedule "official" also runs the unused unified pass."""
        self._check(audio, frames, schedule)
        if direction not in ("patch_to_cls", "cls_to_patch"):
            raise ValueError(f"direction={direction!r} must be 'patch_to_cls' or 'cls_to_patch'")
        a, v = self.embed(audio, frames)
        sa, sv = self.encode_specific(a, v, None)
        if schedule == "official":
            self.joint_unified(sa, sv)
        out = []
        for seq, mod in ((sa, "a"), (sv, "v")):
            cls, attn = self.joint_modal(seq, mod, return_attn=True)
            attn = attn.float()
            s = attn[:, :, 1:, 0] if direction == "patch_to_cls" else attn[:, :, 0, 1:]
            s = s.mean(dim=1)
            if renormalize:
                s = s / s.sum(dim=1, keepdim=True)
            out += [s, cls]
        return TeacherOutput(out[0], out[2], out[1], out[3])

    def extract_features(self, audio: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Retrieval globals on the full view: cls_a, cls_v [B, D] (norm_a / norm_v, not L2-normalised)."""
        self._check(audio, frames, "fast")
        a, v = self.embed(audio, frames)
        sa, sv = self.encode_specific(a, v, None)
        return self.joint_modal(sa, "a"), self.joint_modal(sv, "v")

    def _check(self, audio: Tensor, frames: Tensor, schedule: str) -> None:
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule={schedule!r} must be one of {_SCHEDULES}")
        check_inputs(audio, frames, self.cfg, check_finite=False)  # metadata only, no device sync
