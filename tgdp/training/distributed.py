"""Process group setup, DDP / FSDP2 wrapping and the sharded EMA teacher update.

One process per device (``torchrun``); gloo on CPU, nccl on CUDA. Without ``torchrun`` (no
``WORLD_SIZE`` in the environment) everything runs in one process and no group is created, so the
same code path serves ``python -m tgdp.train``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tgdp.configs import Config, ConfigError

__all__ = ["DistInfo", "check_world", "init_distributed", "shutdown", "wrap_student", "shard_teacher",
           "ema_update_", "all_reduce_", "barrier", "unwrap", "local_tensors", "is_fsdp", "unused_parameters"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_world() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def check_world(cfg: Config, world_size: int | None = None) -> None:
    """Fail before any data is read when the global batch cannot be split evenly across ranks."""
    world = _env_world()[1] if world_size is None else world_size
    if cfg.train.batch_size % world != 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size "
                          f"{world}; choose a multiple of {world}")


def init_distributed(cfg: Config, device: str | None = None) -> DistInfo:
    """Pick the device (CUDA ``LOCAL_RANK`` if available, else CPU) and init the group when launched by torchrun."""
    rank, world, local = _env_world()
    check_world(cfg, world)
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (a device-side collective, no host sync on nccl); identity without a group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place, nothing to unwrap)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _fsdp_shard(module: nn.Module, cfg: Config, forward_methods: tuple[str, ...]) -> None:
    """FSDP2: every block of every ModuleList is its own unit, then the root.

    Both models call their blocks as modules (the fast model's :class:`tgdp.model.fast.PackedBlock`
    runs the packed forward through ``__call__``), so FSDP2's hooks all-gather a block's parameters
    just before it runs and reshard them after, and its backward reduce-scatters per block: the
    communication of one block overlaps the compute of its neighbours. With ``train.fsdp_bf16`` the
    policy computes in bf16 (each unit casts its floating inputs, e.g. the fp32 activations that
    the fp32 sin-cos tables produce, to bf16) and reduces gradients in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dev = next(module.parameters()).device
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.train.fsdp_bf16 else MixedPrecisionPolicy())
    for child in module.modules():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    # The method calls student_forward / teacher_forward, not forward: register them so the root's
    # parameters (patch embeds, CLS, registers) are all-gathered around those calls too.
    for name in forward_methods:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)


FORWARD_METHODS = ("student_forward", "student_forward_single", "teacher_forward", "extract_features")


def wrap_student(method: nn.Module, student: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """DDP around the whole method (teacher params have requires_grad=False, so DDP ignores them), or
    FSDP2 sharding of the student in place. Returns the module to call for the training forward."""
    if not info.enabled:
        return method
    if cfg.train.dist == "fsdp2":
        _fsdp_shard(student, cfg, FORWARD_METHODS)
        return method
    # The official blocks carry three LayerNorm pairs and the modality-specific and decoder blocks
    # run in the unified mode only: their audio/video pairs never get a gradient. They stay
    # parameters (the state dict keeps the official keys), and DDP is told to leave them out, so
    # it expects every other parameter's gradient each step and needs no per-step graph walk
    # (find_unused_parameters). Not static_graph=True: DDP then queues its first all-reduce from a
    # hook on the forward's output tensors, which it finds with torch.utils._pytree; our output is a
    # dataclass, a pytree leaf, so no hook was placed and gradients were never averaged (measured,
    # 2 gloo ranks, torch 2.13: rank gradients differed at every step; equal with a tuple output).
    prefix = next(name for name, m in method.named_modules() if m is student)
    ignored = [f"{prefix}.{n}" if prefix else n for n in unused_parameters(student)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, ignored)
    return nn.parallel.DistributedDataParallel(
        method, device_ids=[info.device.index] if info.device.type == "cuda" else None,
        broadcast_buffers=False,  # buffers are fixed sin-cos tables, identical on every rank
        find_unused_parameters=False)


def unused_parameters(model: nn.Module) -> list[str]:
    """Names of the student parameters no training step uses: the audio/video LayerNorm pairs
    (``norm{1,2}_{a,v}``) of the modality-specific and decoder blocks, which only run unified.
    (tests/test_distributed_units.py checks it is exactly the set left without a gradient.)"""
    out = []
    for lists in ("blocks_a", "blocks_v", "decoder_blocks"):
        for i, _ in enumerate(getattr(model, lists, ())):
            out += [f"{lists}.{i}.norm{j}_{m}.{w}" for j in (1, 2) for m in ("a", "v") for w in ("weight", "bias")]
    return out


def shard_teacher(teacher: nn.Module, cfg: Config, info: DistInfo) -> None:
    """FSDP2: shard the teacher exactly like the student so the EMA lerps matching local shards."""
    if info.enabled and cfg.train.dist == "fsdp2":
        _fsdp_shard(teacher, cfg, FORWARD_METHODS)


def local_tensors(params) -> list[torch.Tensor]:
    """Local shards of (possibly DTensor) parameters, so foreach ops never trigger a collective."""
    out = []
    for p in params:
        t = p.data if isinstance(p, nn.Parameter) else p
        out.append(t.to_local() if hasattr(t, "to_local") else t)
    return out


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, weight: torch.Tensor) -> None:
    """θ_t ← θ_t + w (θ_s − θ_t) over all parameters, w = (1 − m) · [step was finite] on device.

    teacher / student: same architecture and same sharding (names must match one to one).
    weight: 0-dim float tensor on the parameters' device (a tensor so a skipped step costs no sync).
    """
    for m in (*teacher.modules(), *student.modules()):
        if is_fsdp(m):
            # FSDP2 keeps a root unsharded after a forward with no backward (the teacher's); lerp
            # the sharded parameters so both sides hold matching local shards
            m.reshard()
    t_named = dict(teacher.named_parameters())
    s_named = dict(student.named_parameters())
    if t_named.keys() != s_named.keys():
        missing = sorted(set(s_named) ^ set(t_named))[:5]
        raise ValueError(f"teacher and student parameter names differ, e.g. {missing}")
    names = list(s_named)
    t_loc = local_tensors(t_named[n] for n in names)
    s_loc = local_tensors(s_named[n] for n in names)
    if t_loc[0].dtype != s_loc[0].dtype:
        s_loc = [s.to(t.dtype) for s, t in zip(s_loc, t_loc)]
    # Not torch._foreach_lerp_(t, s, weight): with a tensor weight it binds the Scalar overload,
    # which reads the weight on the host (aten::item, a sync every step).
    if t_loc[0].is_cuda:
        _lerp_multi_tensor_(t_loc, s_loc, weight)
    else:
        # one lerp per tensor with the device weight: bitwise what the Scalar overload computed
        # (the CPU has no multi-tensor kernels to lose)
        torch._foreach_lerp_(t_loc, s_loc, [weight] * len(t_loc))


def _lerp_multi_tensor_(t_loc: list, s_loc: list, weight: torch.Tensor) -> None:
    """t += w * (s - t) (lerp's formula for w < 0.5) with the Tensor overloads of foreach sub/mul/add,
    which keep ``weight`` on the device and run as multi-tensor kernels on CUDA (a per-tensor lerp
    list would be one launch per parameter). The difference is a temporary, made in chunks of at
    most _EMA_CHUNK elements. Equal to lerp within one rounding of the product."""
    for i, j in _chunks([t.numel() for t in t_loc], _EMA_CHUNK):
        diff = torch._foreach_sub(s_loc[i:j], t_loc[i:j])
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(t_loc[i:j], diff)


_EMA_CHUNK = 1 << 26   # elements of the EMA temporary (256 MB in fp32)


def _chunks(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive [i, j) ranges of ``sizes`` each summing to at most ``limit`` (a larger item alone)."""
    out, start, acc = [], 0, 0
    for k, n in enumerate(sizes):
        if acc and acc + n > limit:
            out.append((start, k))
            start, acc = k, 0
        acc += n
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out
