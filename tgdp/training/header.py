"""The start-up header of a training run (rank 0): what runs, on what data, where, with which backends.

Printed in two parts by :func:`tgdp.training.launch.train`: :func:`run_lines` before the model and
the data source are built (config, data, out_dir, device, backends that the config and the machine
decide), :func:`model_lines` after (parameter counts, the model and attention actually built).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from tgdp.configs import Config

__all__ = ["Origin", "DataSummary", "run_lines", "model_lines", "loader_backend", "ops_backend"]


@dataclass(frozen=True)
class Origin:
    """Where the config came from: the preset, the TOML file (or None) and the dotted overrides."""

    preset: str
    config_file: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSummary:
    """The training data as the manifest describes it (``root`` None = the noise source)."""

    root: str | None
    num_samples: int | None = None
    num_shards: int | None = None
    skipped_by_prepare: int = 0


def loader_backend(cfg: Config, device: torch.device) -> str:
    """The data path the run uses, resolved as :func:`tgdp.data.loader.make_loader` resolves it."""
    if cfg.data.root == "random":
        return "noise source (data.root=random, no files read)"
    name = cfg.data.loader
    if name == "auto":
        from tgdp.data.dali import dali_available
        name = "dali" if dali_available() and torch.cuda.is_available() else "torch"
    w = cfg.data.num_workers
    name += f" ({w} worker{'s' if w != 1 else ''})"
    if cfg.data.cache_frames > 0:
        name += f", decoded once into a memory cache of {cfg.data.cache_frames} frames per clip"
    if cfg.data.host_masks:
        name += ", host-side masks"
    return name


def ops_backend(device: torch.device) -> str:
    """Which implementation :mod:`tgdp.ops` dispatches to for tensors on ``device``."""
    from tgdp import ops

    forced = os.environ.get("TGDP_FORCE_TRITON", "0") == "1"
    if forced:
        return "Triton kernels (forced by TGDP_FORCE_TRITON=1)"
    if device.type == "cuda" and ops.triton_available():
        return "Triton kernels"
    why = "no CUDA device" if device.type != "cuda" else "triton not installed"
    return f"plain-torch reference ({why})"


def _compile_text(cfg: Config, device: torch.device) -> str:
    t = cfg.train
    if not t.compile:
        graphs = "off" if not t.cuda_graphs else "off (needs train.compile)"
        return f"torch.compile off, CUDA graphs {graphs}"
    graphs = t.cuda_graphs and device.type == "cuda"
    mode = "reduce-overhead" if graphs else "default"
    note = "" if graphs or not t.cuda_graphs else " (no CUDA device)"
    return f"torch.compile mode={mode}, CUDA graphs {'on' if graphs else 'off' + note}"


def _precision(cfg: Config, device: torch.device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16 autocast" if device.type == "cuda" else "fp32"
    return "bf16 autocast" if p == "bf16" else "fp32"


def run_lines(cfg: Config, origin: Origin | None, data: DataSummary, device: torch.device,
              world_size: int) -> list[str]:
    """Header lines known before anything is built."""
    o = origin or Origin(cfg.preset)
    over = " ".join(shlex.quote(a) for a in o.overrides) or "none"
    lines = [f"preset       {o.preset}; config file {o.config_file or 'none'}; overrides {over}"]
    if data.root is None:
        lines.append("data         noise source (data.root=random): deterministic random pairs, no files")
    else:
        lines.append(f"data         {Path(data.root).resolve()}: {data.num_samples} clips in {data.num_shards} "
                     f"shards ({data.skipped_by_prepare} skipped by prepare)")
    lines.append(f"out_dir      {Path(cfg.train.out_dir).resolve()}")
    dist = f"{cfg.train.dist}" if world_size > 1 else "single process"
    lines.append(f"device       {device}, world size {world_size} ({dist}), {_precision(cfg, device)}")
    lines.append(f"loader       {loader_backend(cfg, device)}")
    lines.append(f"ops          {ops_backend(device)}")
    lines.append(f"compile      {_compile_text(cfg, device)}")
    return lines


def _count(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def model_lines(cfg: Config, student: torch.nn.Module, teacher: torch.nn.Module, device: torch.device,
                total_steps: int) -> list[str]:
    """Header lines known once the model is built: implementation, attention, parameter counts, plan."""
    total, trainable = _count(student)
    t_total, _ = _count(teacher)
    attn = student.attention_backend(device) if hasattr(student, "attention_backend") else \
        "explicit softmax(QK^T)V (reference model)"
    m = cfg.model
    return [f"model        {type(student).__name__}: {m.embed_dim}-wide, depth {m.depth} "
            f"({m.modality_specific_depth} per modality + {m.joint_depth} joint), decoder depth {m.decoder_depth}",
            f"parameters   student {_millions(total)} ({_millions(trainable)} trainable); EMA teacher "
            f"{_millions(t_total)} (frozen)",
            f"attention    {attn} (model.attn_backend={m.attn_backend})",
            f"plan         {total_steps} steps x global batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
            f"checkpoint every {cfg.train.ckpt_every}, log every {cfg.train.log_every}"]
