"""TG-DP: teacher-guided dual-path pretraining on top of any model implementing the protocol.

One step (:meth:`TGDP.forward`):

1. teacher (EMA copy, no grad) on the full, unshuffled view -> patch scores + global targets;
2. reconstruction masks: random at ``masking.rec_ratio``; contrastive masks: guided by the teacher
   scores at ``masking.con_ratio`` (``distinct`` top-k, ``gumbel``, or ``random``), optionally with the
   official shuffled-index bug (``masking.official_compat``);
3. ``student_forward`` on both views;
4. ``loss = w_rec * (L_rec_a + L_rec_v) + w_dis * L_dis + w_con * L_con``.

``masking.dual_path = false`` is the CAV-MAE Sync single pass instead (the paper's baseline): only
the reconstruction masks are drawn, ``student_forward_single`` takes the contrastive globals from
the reconstruction view, and the teacher runs only for distillation (``loss.w_dis > 0``).

The teacher is updated by the caller after the optimizer step: :meth:`TGDP.update_teacher`.
The optimizer must see only ``tgdp.student.parameters()`` (the teacher's are frozen anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tgdp import ops
from tgdp.configs import Config
from tgdp.losses import distill_mse, info_nce
from tgdp.masking import Masks, guided_masks, official_compat_ranks, random_masks
from tgdp.patching import audio_as_image
from tgdp.reference.model import CAVMAESync, StudentOutput, TeacherOutput
from tgdp.teacher import EMATeacher, momentum_at
from tgdp.validate import check_inputs, check_masks

__all__ = ["TGDP", "TGDPOutput", "StudentOutput", "TeacherOutput"]


@dataclass(frozen=True)
class TGDPOutput:
    """All losses are 0-dim fp32 tensors (no host sync); masks are (audio, video) pairs."""

    loss: Tensor          # w_rec * loss_rec + w_dis * loss_dis + w_con * loss_con
    loss_rec: Tensor      # loss_rec_a + loss_rec_v (unweighted)
    loss_rec_a: Tensor
    loss_rec_v: Tensor
    loss_dis: Tensor      # distillation to the teacher's globals (unweighted; 0 when not computed)
    loss_con: Tensor      # InfoNCE (unweighted)
    acc: Tensor           # contrastive retrieval accuracy within the (gathered) batch
    masks_rec: tuple[Masks, Masks]
    masks_con: tuple[Masks, Masks]   # the rec masks again in the single pass (masking.dual_path false)


class TGDP(nn.Module):
    """Student (reference :class:`CAVMAESync` unless ``model`` is given) + :class:`EMATeacher`."""

    def __init__(self, cfg: Config, model: nn.Module | None = None, *, device=None, dtype=None,
                 check_finite: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.student = model if model is not None else CAVMAESync(cfg.model, device=device, dtype=dtype)
        self.teacher = EMATeacher(self.student)
        # The finite-value input check syncs with the device; the GPU hot loop turns it off.
        self.check_finite = check_finite

    @property
    def runs_teacher(self) -> bool:
        """Whether a step with drawn masks runs the teacher: for distillation, or to guide the
        contrastive masks of the dual path."""
        c = self.cfg
        return c.loss.w_dis > 0 or (c.masking.dual_path and c.masking.guide != "random")

    # ------------------------------------------------------------------ masks

    def make_masks(self, batch: int, device: torch.device, generator: torch.Generator,
                   teacher: TeacherOutput | None) -> tuple[tuple[Masks, Masks], tuple[Masks, Masks]]:
        """Random reconstruction masks, then guided contrastive masks (in this order on ``generator``)."""
        mc, m = self.cfg.masking, self.cfg.model
        rec = (random_masks(batch, m.num_patches_a, mc.rec_ratio, generator, device),
               random_masks(batch, m.num_patches_v, mc.rec_ratio, generator, device))
        if not mc.dual_path:
            return rec, rec   # single pass: the contrastive view is the reconstruction view
        if mc.guide == "random":
            con = (random_masks(batch, m.num_patches_a, mc.con_ratio, generator, device),
                   random_masks(batch, m.num_patches_v, mc.con_ratio, generator, device))
            return rec, con
        con_list = []
        for scores in (teacher.scores_a, teacher.scores_v):
            if mc.official_compat:
                scores = official_compat_ranks(scores, generator)
            con_list.append(guided_masks(scores, mc.con_ratio, mc.guide, generator, mc.gumbel_tau))
        return rec, (con_list[0], con_list[1])

    # ------------------------------------------------------------------ step

    def forward(self, audio: Tensor, frames: Tensor, generator: torch.Generator | None = None,
                masks_rec: tuple[Masks, Masks] | None = None, masks_con: tuple[Masks, Masks] | None = None,
                *, schedule: str = "fast") -> TGDPOutput:
        """audio [B, T, F], frames [B, C, S, S]; ``generator`` (on the inputs' device) draws the masks
        not given. Precomputed masks (host-packed, or for parity tests) skip the drawing."""
        cfg = self.cfg
        check_inputs(audio, frames, cfg.model, check_finite=self.check_finite)
        b, dev = audio.shape[0], audio.device
        dual = cfg.masking.dual_path
        if not dual and masks_con is not None:
            raise ValueError("masks_con given with masking.dual_path=false: the single pass has no "
                             "contrastive view (it uses masks_rec)")
        for name, pair in (("masks_rec", masks_rec), ("masks_con", masks_con)):
            if pair is not None:
                check_masks(pair[0], b, cfg.model.num_patches_a, f"{name}[0]")
                check_masks(pair[1], b, cfg.model.num_patches_v, f"{name}[1]")
        need_masks = masks_rec is None or (dual and masks_con is None)
        if need_masks:
            if generator is None:
                raise ValueError("generator=None: a torch.Generator is needed to draw the masks")
            if generator.device.type != dev.type:
                raise ValueError(f"generator device={generator.device} != inputs device={dev}")
        need_teacher = cfg.loss.w_dis > 0 or (masks_con is None and self.runs_teacher)

        teacher = None
        if need_teacher:
            with torch.no_grad():
                teacher = self.teacher.module.teacher_forward(
                    audio, frames, direction=cfg.masking.score_direction,
                    renormalize=cfg.masking.renormalize_scores, schedule=schedule)
        if need_masks:
            rec, con = self.make_masks(b, dev, generator, teacher)
            masks_rec = masks_rec if masks_rec is not None else rec
            masks_con = masks_con if masks_con is not None else con

        if dual:
            out = self.student.student_forward(audio, frames, rec=masks_rec, con=masks_con,
                                               rec_grad_to_cls=cfg.loss.rec_grad_to_cls, schedule=schedule)
        else:
            masks_con = masks_rec
            out = self.student.student_forward_single(audio, frames, rec=masks_rec, schedule=schedule)
        p, norm_pix = cfg.model.patch_size, cfg.loss.norm_pix_loss
        loss_rec_a = ops.masked_mse(out.pred_a, audio_as_image(audio), masks_rec[0].mask, p, norm_pix=norm_pix)
        loss_rec_v = ops.masked_mse(out.pred_v, frames, masks_rec[1].mask, p, norm_pix=norm_pix)
        loss_rec = loss_rec_a + loss_rec_v
        loss_con, acc = info_nce(out.cls_a, out.cls_v, cfg.loss.temperature,
                                 symmetric=cfg.loss.symmetric, gather=cfg.loss.gather)
        if teacher is not None:
            loss_dis = distill_mse(out.cls_a, out.cls_v, teacher.cls_a, teacher.cls_v,
                                   normalize=cfg.loss.dis_normalize)
        else:
            loss_dis = torch.zeros((), device=dev, dtype=torch.float32)
        w = cfg.loss
        loss = w.w_rec * loss_rec + w.w_dis * loss_dis + w.w_con * loss_con
        return TGDPOutput(loss, loss_rec, loss_rec_a, loss_rec_v, loss_dis, loss_con, acc,
                          masks_rec, masks_con)

    def extract_features(self, audio: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Student retrieval globals cls_a, cls_v [B, D]."""
        check_inputs(audio, frames, self.cfg.model, check_finite=self.check_finite)
        return self.student.extract_features(audio, frames)

    def update_teacher(self, step: int, total_steps: int) -> float:
        """EMA update after the optimizer step; returns the momentum used."""
        m = momentum_at(self.cfg.teacher, step, total_steps)
        self.teacher.update(self.student, m)
        return m
