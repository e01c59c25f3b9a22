"""Typed, frozen run configuration.

One :class:`Config` holds eight sections (model, masking, loss, teacher, data, train, eval, probe).
Presets are functions: :func:`paper` (the published recipe), :func:`tgdp` (our improved recipe; the
dataclass defaults) and :func:`tiny` (``tgdp`` at demo size); a TOML file and dotted CLI overrides
(``--model.depth 4``) are applied on top of a preset with :func:`load`. Every value is checked
when the config is built (:meth:`Config.validate`), so a bad run fails before any data is read.

Assumptions we had to make because the paper and the released code leave them open are marked
``ASSUMPTION`` next to the field; README "Presets" lists every ``paper()`` value with its source.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tgdp import config_io
from tgdp.config_io import ConfigError, apply_overrides, check as _check, parse_cli_overrides, to_dict
from tgdp.probe_config import PROBE_TASKS, ProbeConfig, probe_task

__all__ = [
    "ModelConfig", "MaskingConfig", "LossConfig", "TeacherConfig", "DataConfig", "TrainConfig",
    "EvalConfig", "ProbeConfig", "Config", "ConfigError", "paper", "tgdp", "tiny", "PRESETS", "PROBE_TASKS",
    "probe_task", "load", "apply_overrides", "to_dict", "from_dict", "parse_cli_overrides",
]


@dataclass(frozen=True)
class ModelConfig:
    """CAV-MAE Sync backbone. Defaults are the evaluated TG-DP model (spec §1.1)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    audio_length: int = 416          # fbank frames per window (time axis), multiple of patch_size
    n_mels: int = 128                # fbank bins (frequency axis), multiple of patch_size
    embed_dim: int = 768
    depth: int = 12                  # total encoder depth = modality_specific_depth + joint depth
    modality_specific_depth: int = 11
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    num_register_tokens: int = 8     # per modality; appended after the patches, dropped before the joint layer
    ln_eps: float = 1e-5             # official CAV-MAE eps (not MAE's 1e-6)
    # Attention implementation of the fast model: auto = FlashAttention if importable on CUDA, else SDPA.
    attn_backend: Literal["auto", "flash", "sdpa", "math"] = "auto"

    # ---- derived geometry (never hard-coded elsewhere) ----
    @property
    def joint_depth(self) -> int:
        return self.depth - self.modality_specific_depth

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(freq rows, time cols) of the audio patch grid: (8, 26) for 128 mels x 416 frames."""
        return self.n_mels // self.patch_size, self.audio_length // self.patch_size

    @property
    def video_grid(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_patches_a(self) -> int:
        h, w = self.audio_grid
        return h * w

    @property
    def num_patches_v(self) -> int:
        h, w = self.video_grid
        return h * w

    @property
    def patch_dim_a(self) -> int:
        return self.patch_size * self.patch_size

    @property
    def patch_dim_v(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def validate(self, prefix: str = "model") -> None:
        p = self.patch_size
        _check(p > 0, f"{prefix}.patch_size", p, "must be > 0")
        _check(self.audio_length > 0 and self.audio_length % p == 0, f"{prefix}.audio_length",
               self.audio_length, f"must be a positive multiple of patch_size={p}")
        _check(self.n_mels > 0 and self.n_mels % p == 0, f"{prefix}.n_mels", self.n_mels,
               f"must be a positive multiple of patch_size={p}")
        _check(self.img_size > 0 and self.img_size % p == 0, f"{prefix}.img_size", self.img_size,
               f"must be a positive multiple of patch_size={p}")
        _check(self.in_chans > 0, f"{prefix}.in_chans", self.in_chans, "must be > 0")
        _check(self.embed_dim > 0 and self.embed_dim % self.num_heads == 0, f"{prefix}.embed_dim",
               self.embed_dim, f"must be divisible by num_heads={self.num_heads}")
        _check(self.decoder_embed_dim > 0 and self.decoder_embed_dim % self.decoder_num_heads == 0,
               f"{prefix}.decoder_embed_dim", self.decoder_embed_dim,
               f"must be divisible by decoder_num_heads={self.decoder_num_heads}")
        _check(0 <= self.modality_specific_depth < self.depth, f"{prefix}.modality_specific_depth",
               self.modality_specific_depth, f"must be in [0, depth={self.depth})")
        _check(self.decoder_depth >= 1, f"{prefix}.decoder_depth", self.decoder_depth, "must be >= 1")
        _check(self.num_register_tokens >= 0, f"{prefix}.num_register_tokens",
               self.num_register_tokens, "must be >= 0")
        _check(self.mlp_ratio > 0, f"{prefix}.mlp_ratio", self.mlp_ratio, "must be > 0")
        _check(self.ln_eps > 0, f"{prefix}.ln_eps", self.ln_eps, "must be > 0")


@dataclass(frozen=True)
class MaskingConfig:
    rec_ratio: float = 0.75          # reconstruction path, random masking (both modalities)
    con_ratio: float = 0.50          # contrastive path (paper: 0.50; official code default 0.75)
    # How the contrastive path picks its visible tokens from the teacher scores.
    guide: Literal["distinct", "gumbel", "random"] = "distinct"
    gumbel_tau: float = 1.0          # gumbel: softmax(raw scores / tau), as the official prob mode (tau 1.0)
    # Which attention the teacher score reads: patch queries -> CLS key (official) or CLS query -> patch keys.
    score_direction: Literal["patch_to_cls", "cls_to_patch"] = "patch_to_cls"
    # divide by the sum over patches (paper: "normalized across spatial tokens"); applied for
    # guide=distinct only, where top-k is invariant to it (gumbel samples from the raw scores)
    renormalize_scores: bool = True
    # Reproduce the official bug: the teacher ranks positions of a randomly *shuffled* sequence.
    official_compat: bool = False
    # False = the CAV-MAE Sync single pass (the TG-DP paper's baseline): one student pass on the
    # reconstruction view, the contrastive loss on that view's CLS (not detached; con_ratio, guide and
    # loss.rec_grad_to_cls unused), the teacher only if loss.w_dis > 0.
    dual_path: bool = True

    def validate(self, prefix: str = "masking") -> None:
        for name in ("rec_ratio", "con_ratio"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"{prefix}.{name}", v, "must be in [0, 1)")
        _check(self.gumbel_tau > 0, f"{prefix}.gumbel_tau", self.gumbel_tau, "must be > 0")


@dataclass(frozen=True)
class LossConfig:
    w_rec: float = 1.0               # lambda_1 (official Sync: w_mae 1.0)
    w_dis: float = 0.1               # lambda_2  ASSUMPTION: unpublished
    w_con: float = 0.1               # lambda_3  (Sync AS-2M script: w_c 0.1)
    norm_pix_loss: bool = True       # Sync-dev pretraining script: True (unbiased var + 1e-6)
    temperature: float = 0.05        # fixed, not learned (official)
    symmetric: bool = False          # official local loss is video->audio only; True = mean of both directions
    gather: bool = True              # all-gather negatives across ranks (autograd) when distributed
    # Distillation: || g - g_teacher ||^2 summed over dims, mean over batch, summed over modalities.
    dis_normalize: bool = True       # ASSUMPTION: L2-normalise both globals first (the contrastive space)
    # The reconstruction pass prepends the CLS tokens (as the official code does) but detached, so the
    # MAE loss cannot train cls_token_a/v through attention. True = official (rec gradients reach them).
    rec_grad_to_cls: bool = False

    def validate(self, prefix: str = "loss") -> None:
        for name in ("w_rec", "w_dis", "w_con"):
            v = getattr(self, name)
            _check(v >= 0, f"{prefix}.{name}", v, "must be >= 0")
        _check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "must be > 0")


@dataclass(frozen=True)
class TeacherConfig:
    # ASSUMPTION: the paper's EMA momentum is unpublished; 0.999 constant by default.
    momentum: float = 0.999
    schedule: Literal["constant", "cosine"] = "constant"
    momentum_end: float = 1.0        # cosine: momentum goes momentum -> momentum_end over the run

    def validate(self, prefix: str = "teacher") -> None:
        _check(0.0 <= self.momentum <= 1.0, f"{prefix}.momentum", self.momentum, "must be in [0, 1]")
        _check(0.0 <= self.momentum_end <= 1.0, f"{prefix}.momentum_end", self.momentum_end,
               "must be in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    # folder of shards (manifest.json); "" = none: training needs it or --demo (the embedded demo set); "random" = synthetic noise source
    # for tests/benchmarks (global sample i -> a deterministic random pair seeded by (train.seed, i),
    # so single-process and distributed runs with the same global batch see identical data)
    root: str = ""
    demo_dir: str = "~/.cache/tgdp/demo"
    loader: Literal["auto", "dali", "torch"] = "auto"
    num_workers: int = 2
    frames_per_clip: int = 16
    sample_rate: int = 16000
    fbank_frames: int = 1024         # fbank padded/cut to this many frames before windowing (official)
    fbank_mean: float = -5.081
    fbank_std: float = 4.4849
    pad: Literal["floor", "zero"] = "floor"   # "zero" = official (log-mel 0 padding, a bug)
    window: Literal["frame_time", "official"] = "frame_time"  # official: centre at 64*i (drifts 0.24 s)
    time_shift: float = 0.0          # circular shift of the window, fraction of its length (train only)
    eval_frame: int = 8
    shuffle_buffer: int = 256
    # Training only: 0 = stream the shards through the loader; K > 0 = decode the split once and keep
    # K evenly spaced frames per clip (with their audio windows) in memory as fp16 (small sets: the demo)
    cache_frames: int = 0
    # Training only: draw the reconstruction masks on the host with tgdp.pack (C++ when built) while
    # the batch is assembled, seeded by (train.seed, step, global sample), so audio padding patches
    # are never visible (torch loader / cache / noise sources; the DALI loader lacks valid lengths)
    host_masks: bool = False
    # Audio channel kept by tgdp.prepare: "first" (the official rule) or "mix" (mean of all channels).
    # The shards record the rule; training and eval refuse shards prepared with the other one.
    channels: Literal["first", "mix"] = "first"
    # CPU threads of the DALI pipeline per rank (DALI decodes FLAC on the CPU only); 0 = auto: the
    # CPUs this process may use / ranks per node (tgdp.data.dali.default_threads), at least 2
    dali_threads: int = 0

    def validate(self, prefix: str = "data") -> None:
        _check(self.frames_per_clip >= 1, f"{prefix}.frames_per_clip", self.frames_per_clip, "must be >= 1")
        _check(self.sample_rate > 0, f"{prefix}.sample_rate", self.sample_rate, "must be > 0")
        _check(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "must be >= 0")
        _check(self.dali_threads >= 0, f"{prefix}.dali_threads", self.dali_threads, "must be >= 0 (0 = auto)")
        _check(self.fbank_std > 0, f"{prefix}.fbank_std", self.fbank_std, "must be > 0")
        _check(0 <= self.eval_frame < self.frames_per_clip, f"{prefix}.eval_frame", self.eval_frame,
               f"must be in [0, frames_per_clip={self.frames_per_clip})")
        _check(0.0 <= self.time_shift < 1.0, f"{prefix}.time_shift", self.time_shift, "must be in [0, 1)")
        _check(0 <= self.cache_frames <= self.frames_per_clip, f"{prefix}.cache_frames", self.cache_frames,
               f"must be in [0, frames_per_clip={self.frames_per_clip}]")
        _check(isinstance(self.host_masks, bool), f"{prefix}.host_masks", self.host_masks, "must be a bool")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 0                   # total optimizer steps; 0 = derive from epochs
    epochs: float = 35.0             # supplement Table 1
    batch_size: int = 512            # global batch (8 x 64 in the paper)
    lr: float = 2e-4
    min_lr_ratio: float = 0.1        # cosine floor = 0.1 * lr (Sync-dev scheduler)
    warmup_frac: float = 0.1         # linear warmup over this fraction of all steps
    weight_decay: float = 5e-7
    betas: tuple[float, float] = (0.95, 0.999)
    # adam = torch Adam, weight decay added to the gradient (coupled L2, the official scripts);
    # adamw = decoupled decay. Both fused (the non-finite skip needs the fused kernel's found_inf).
    optimizer: Literal["adam", "adamw"] = "adamw"
    grad_clip: float = 0.0           # 0 = off (official: no clipping)
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    cuda_graphs: bool = False
    dist: Literal["ddp", "fsdp2"] = "ddp"
    fsdp_bf16: bool = False
    seed: int = 0
    out_dir: str = "runs/tgdp"
    ckpt_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    resume: bool = False
    # A fresh run in an out_dir that holds another run's files is refused; True moves those files to
    # <out_dir>/replaced/<time>-<run id>/ first (never deletes them).
    overwrite: bool = False
    init: str = ""                   # optional official / tgdp checkpoint to start from
    # student implementation: "auto" = tgdp.model.FastCAVMAESync when importable, else the reference
    model_impl: Literal["auto", "reference", "fast"] = "auto"

    def validate(self, prefix: str = "train") -> None:
        _check(self.steps >= 0, f"{prefix}.steps", self.steps, "must be >= 0")
        _check(self.epochs > 0 or self.steps > 0, f"{prefix}.epochs", self.epochs,
               "must be > 0 when train.steps is 0")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(0 <= self.warmup_frac < 1, f"{prefix}.warmup_frac", self.warmup_frac, "must be in [0, 1)")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{prefix}.betas",
               self.betas, "must be two values in [0, 1)")
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.ckpt_every >= 1, f"{prefix}.ckpt_every", self.ckpt_every, "must be >= 1")
        _check(self.keep_last >= 1, f"{prefix}.keep_last", self.keep_last, "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, "must be >= 1")
        _check(not (self.resume and self.overwrite), f"{prefix}.overwrite", self.overwrite,
               "cannot be combined with train.resume=true (resume continues the folder's run; overwrite "
               "moves it aside)")


@dataclass(frozen=True)
class EvalConfig:
    retrieval_videos: int = 1600     # official: all ~1,545 VGGSound retrieval videos
    batch_videos: int = 50
    chunk: int = 4096                # rows of the similarity matrix computed at once

    def validate(self, prefix: str = "eval") -> None:
        _check(self.retrieval_videos >= 1, f"{prefix}.retrieval_videos", self.retrieval_videos, "must be >= 1")
        _check(self.batch_videos >= 1, f"{prefix}.batch_videos", self.batch_videos, "must be >= 1")
        _check(self.chunk >= 1, f"{prefix}.chunk", self.chunk, "must be >= 1")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    preset: str = "tgdp"

    def validate(self) -> "Config":
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                _check_finite(section, f.name)
                section.validate(f.name)
        _check_mask_ratios(self)
        return self


# ----------------------------------------------------------------------------- presets

def paper() -> Config:
    """The published recipe on the evaluated model: every value the paper, its supplement or the
    released code states, the marked assumptions elsewhere (README "Presets" gives each source).
    Differs from :func:`tgdp` in the optimizer (Adam + L2), eq. 6 distillation, the CLS trained by
    reconstruction, the official audio window / padding and the random time shift."""
    return Config(
        loss=LossConfig(dis_normalize=False, rec_grad_to_cls=True),
        # time_shift: Table 1 "Random Shift: Yes", amount unpublished (ASSUMPTION): 0.5 draws the
        # roll uniformly from all window offsets, like the CAV-MAE loader's random roll
        data=DataConfig(pad="zero", window="official", time_shift=0.5),
        train=TrainConfig(optimizer="adam"),
        preset="paper",
    ).validate()


def tgdp() -> Config:
    """Our improved recipe (the dataclass defaults): audio windows centred on the frame time, fbank
    padding at the log floor, no random roll, reconstruction gradients kept off the CLS tokens,
    distillation on L2-normalised globals, AdamW. README "Presets" gives the reason for each."""
    return Config(preset="tgdp").validate()


def tiny() -> Config:
    """:func:`tgdp` at demo size: same structure, small enough to pretrain on 2 CPU cores in minutes."""
    base = tgdp()
    return dataclasses.replace(
        base,
        model=ModelConfig(img_size=96, embed_dim=96, depth=4, modality_specific_depth=3, num_heads=4,
                          decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                          num_register_tokens=2),
        loss=dataclasses.replace(base.loss, w_dis=0.1, w_con=1.0),
        teacher=dataclasses.replace(base.teacher, momentum=0.99),
        data=dataclasses.replace(base.data, num_workers=1, cache_frames=4),  # demo split decoded once
        # lr 1e-3 collapsed the contrastive globals (loss stuck at ln B); 3e-4 with 10 % warmup takes
        # off after ~150 steps, and 1000 steps fit the main job's 15-minute CPU budget
        train=dataclasses.replace(base.train, steps=1000, batch_size=32, lr=3e-4, warmup_frac=0.1,
                                  ckpt_every=100, log_every=10, out_dir="runs/tiny"),
        eval=dataclasses.replace(base.eval, retrieval_videos=64, batch_videos=16),
        preset="tiny",
    ).validate()


PRESETS = {"paper": paper, "tgdp": tgdp, "tiny": tiny}

# ----------------------------------------------------------------------------- internals

def _check_finite(section: Any, prefix: str) -> None:
    """Every float field (and float inside a tuple field) of ``section`` is finite: inf/nan pass
    ``> 0``-style range checks or fail them with a misleading reason, so they are named first."""
    for f in fields(section):
        v = getattr(section, f.name)
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{prefix}.{f.name}={v!r} must be a finite number")


def _check_mask_ratios(cfg: "Config") -> None:
    """Each mask ratio leaves at least one visible patch per modality (the official ``int(N (1 - r))``
    kept tokens), and the reconstruction ratio masks at least one patch (its loss averages over them)."""
    m = cfg.model
    for mod, n in (("audio", m.num_patches_a), ("video", m.num_patches_v)):
        for name in ("rec_ratio", "con_ratio"):
            r = getattr(cfg.masking, name)
            keep = int(n * (1 - r))
            _check(keep >= 1, f"masking.{name}", r, f"leaves no visible {mod} patch of {n} (int({n} * (1 - r)) = "
                                                    f"{keep}); use a smaller ratio")
        keep = int(n * (1 - cfg.masking.rec_ratio))
        _check(keep < n, "masking.rec_ratio", cfg.masking.rec_ratio,
               f"masks no {mod} patch of {n}, so the reconstruction loss has nothing to reconstruct; use a "
               "ratio > 0")


# ----------------------------------------------------------------------------- loading (tgdp.config_io)

def load(preset: str = "paper", file: str | Path | None = None,
         overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Preset, then TOML file (``[model]`` tables etc.), then dotted overrides; validated."""
    return config_io.load(PRESETS, preset, file, overrides)


def from_dict(d: dict[str, Any], base: Config | None = None) -> Config:
    """Build a config from a nested dict (e.g. a checkpoint's) on top of ``base`` (default: its preset)."""
    return config_io.from_dict(PRESETS, d, base)
