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
from tgdp.masking import Masks, guided_masks, num_keep, official_compat_ranks, uniform_masks
from tgdp.patching import audio_as_image
from tgdp.reference.model import CAVMAESync, StudentOutput, TeacherOutput
from tgdp.teacher import EMATeacher, momentum_at
from tgdp.validate import check_inputs, check_masks

__all__ = ["TGDP", "TGDPOutput", "MaskNoise", "StudentOutput", "TeacherOutput"]


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


@dataclass(frozen=True)
class MaskNoise:
    """The U[0, 1) draws of one step's random masks ([B, Na] audio, [B, Nv] video), None where the mask
    is given or needs no randomness. Drawn eagerly by :meth:`TGDP.draw_noise` so that a compiled
    forward holds no ``torch.Generator`` (a graph break) and replays the same masks as eager."""

    rec_a: Tensor | None = None      # reconstruction masks (random)
    rec_v: Tensor | None = None
    perm_a: Tensor | None = None     # masking.official_compat: the shuffle the official teacher ranked
    perm_v: Tensor | None = None
    con_a: Tensor | None = None      # contrastive masks: guide "random" or "gumbel"
    con_v: Tensor | None = None


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

    def prepare_layouts(self, batch: int, device: torch.device | str) -> None:
        """Build the packed layouts of a ``batch``-row step before a compiled forward (fast model only;
        a no-op for the reference model, which has none). Cheap once built: dict lookups."""
        mc, m = self.cfg.masking, self.cfg.model
        rec, con = [(num_keep(m.num_patches_a, r), num_keep(m.num_patches_v, r)) for r in (mc.rec_ratio, mc.con_ratio)]
        for model in (self.student, self.teacher.module):
            prepare = getattr(model, "prepare_layouts", None)
            if prepare is not None:   # the second call finds the layouts cached: it resolves the backend
                prepare(batch, rec, con, device)

    def noise_fields(self, rec: bool = True, con: bool = True) -> tuple[str, ...]:
        """The :class:`MaskNoise` fields a step needs, in drawing order (rec; then per modality the
        official_compat shuffle and the gumbel draw, or the random con masks)."""
        mc = self.cfg.masking
        con = con and mc.dual_path   # the single pass has no contrastive view
        fields = ["rec_a", "rec_v"] if rec else []
        if con and mc.guide == "random":
            fields += ["con_a", "con_v"]
        elif con:
            for mod in ("a", "v"):
                fields += ([f"perm_{mod}"] if mc.official_compat else []) + \
                          ([f"con_{mod}"] if mc.guide == "gumbel" else [])
        return tuple(fields)

    def draw_noise(self, batch: int, device: torch.device, generator: torch.Generator | None, *,
                   rec: bool = True, con: bool = True) -> MaskNoise:
        """Draw the uniforms of the masks a step needs (``rec``: reconstruction masks; ``con``:
        contrastive masks) from ``generator``, in a fixed order: rec audio, rec video, then the
        contrastive draws (official_compat shuffle, gumbel/random draw) of audio, then of video.
        With ``guide="distinct"`` and no official_compat the contrastive masks use no randomness."""
        fields = self.noise_fields(rec, con)
        if fields and generator is None:
            raise ValueError("generator=None: a torch.Generator is needed to draw the masks")
        if fields and generator.device.type != torch.device(device).type:
            raise ValueError(f"generator device={generator.device} != inputs device={device}")
        m = self.cfg.model
        n = {"a": m.num_patches_a, "v": m.num_patches_v}
        return MaskNoise(**{f: torch.rand(batch, n[f[-1]], generator=generator, device=device) for f in fields})

    def make_masks(self, noise: MaskNoise, teacher: TeacherOutput | None, rec: bool = True,
                   con: bool = True) -> tuple[tuple[Masks, Masks] | None, tuple[Masks, Masks] | None]:
        """Random reconstruction masks and guided (or random) contrastive masks from ``noise``
        (and the teacher's scores); None for the side not asked for."""
        mc = self.cfg.masking
        missing = [f for f in self.noise_fields(rec, con) if getattr(noise, f) is None]
        if missing:
            raise ValueError(f"noise lacks {missing} for masking.guide={mc.guide!r}, "
                             f"official_compat={mc.official_compat}")
        masks_rec = masks_con = None
        con = con and mc.dual_path
        if rec:
            masks_rec = (uniform_masks(noise.rec_a, mc.rec_ratio), uniform_masks(noise.rec_v, mc.rec_ratio))
        if con and mc.guide == "random":
            masks_con = (uniform_masks(noise.con_a, mc.con_ratio), uniform_masks(noise.con_v, mc.con_ratio))
        elif con:
            pair = []
            for scores, mod in ((teacher.scores_a, "a"), (teacher.scores_v, "v")):
                if mc.official_compat:
                    scores = official_compat_ranks(scores, noise=getattr(noise, f"perm_{mod}"))
                pair.append(guided_masks(scores, mc.con_ratio, mc.guide, None, mc.gumbel_tau,
                                         noise=getattr(noise, f"con_{mod}")))
            masks_con = (pair[0], pair[1])
        return masks_rec, masks_con

    # ------------------------------------------------------------------ step

    def forward(self, audio: Tensor, frames: Tensor, generator: torch.Generator | None = None,
                masks_rec: tuple[Masks, Masks] | None = None, masks_con: tuple[Masks, Masks] | None = None,
                *, noise: MaskNoise | None = None, schedule: str = "fast") -> TGDPOutput:
        """audio [B, T, F], frames [B, C, S, S]. The masks not given are drawn from ``noise``
        (:meth:`draw_noise`; what a compiled training step passes) or else from ``generator`` (on the
        inputs' device; only the draws the missing masks need, in :meth:`draw_noise`'s order).
        Precomputed masks (host-packed, or for parity tests) skip their draws."""
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
        need_rec, need_con = masks_rec is None, dual and masks_con is None
        if noise is None:
            noise = self.draw_noise(b, dev, generator, rec=need_rec, con=need_con)
        need_teacher = cfg.loss.w_dis > 0 or (need_con and cfg.masking.guide != "random")

        teacher = None
        if need_teacher:
            with torch.no_grad():
                teacher = self.teacher.module.teacher_forward(
                    audio, frames, direction=cfg.masking.score_direction,
                    # the Gumbel guide samples from softmax(raw scores), as the official prob mode;
                    # top-k ("distinct") is invariant to the renormalisation
                    renormalize=cfg.masking.renormalize_scores and cfg.masking.guide == "distinct",
                    schedule=schedule)
        if need_rec or need_con:
            rec, con = self.make_masks(noise, teacher, rec=need_rec, con=need_con)
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
