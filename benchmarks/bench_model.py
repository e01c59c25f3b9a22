"""One TG-DP training step (teacher fwd + student dual path fwd+bwd): fast model vs reference (opt-in).

    pytest benchmarks/bench_model.py          # pytest-benchmark table; counted GFLOP/s in extra_info
    python benchmarks/bench_model.py [ROUNDS] [THREADS]   # interleaved side-by-side step-time ratio

Shapes: ``tiny()`` and a 2-layer slice of ``paper()`` (depth 2 = 1 modality block + 1 joint block,
1 decoder block; full 416x128 audio and 224x224 frames), batch 2 on CPU / 16 on CUDA, fp32 on CPU.
Both models get the same weights and the same masks. On a shared CPU, compare the two providers only
within one run: the print-out alternates them round by round. THREADS (intra-op threads, default 1)
matters on a loaded box: with 2 OpenMP threads and the other core busy, every parallel op waits for
the slow thread, which punishes the reference's many small ops far more than the model's cost
(we saw 5-20x swings); 1 thread gives a stable ratio.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from tgdp.configs import Config, apply_overrides, paper, tiny
from tgdp.masking import random_masks
from tgdp.method import TGDP
from tgdp.model import FastCAVMAESync
from tgdp.reference.model import CAVMAESync

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
BATCH = 16 if ON_CUDA else 2
SLICE = ["--model.depth", "2", "--model.modality_specific_depth", "1", "--model.decoder_depth", "1"]
PRESETS = {"tiny": lambda: tiny(), "paper_slice": lambda: apply_overrides(paper(), SLICE).validate()}


def build(cfg: Config, provider: str, state=None) -> TGDP:
    cls = FastCAVMAESync if provider == "fast" else CAVMAESync
    torch.manual_seed(0)
    method = TGDP(cfg, cls(cfg.model, device=DEVICE), check_finite=False)
    if state is not None:
        method.load_state_dict(state)
    return method


def inputs(cfg: Config, batch: int = BATCH):
    m, mc = cfg.model, cfg.masking
    g = torch.Generator(device=DEVICE).manual_seed(0)
    audio = torch.randn(batch, m.audio_length, m.n_mels, generator=g, device=DEVICE)
    frames = torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=g, device=DEVICE)
    rec = (random_masks(batch, m.num_patches_a, mc.rec_ratio, g, DEVICE),
           random_masks(batch, m.num_patches_v, mc.rec_ratio, g, DEVICE))
    con = (random_masks(batch, m.num_patches_a, mc.con_ratio, g, DEVICE),
           random_masks(batch, m.num_patches_v, mc.con_ratio, g, DEVICE))
    return audio, frames, rec, con


def step_fn(method: TGDP, audio, frames, rec, con):
    def step():
        method.student.zero_grad(set_to_none=True)
        out = method(audio, frames, masks_rec=rec, masks_con=con)
        out.loss.backward()
        if ON_CUDA:
            torch.cuda.synchronize()   # kernels are async: time their completion
        return out.loss
    return step


@pytest.fixture
def cpu_threads():
    """Intra-op threads on CPU (``TGDP_BENCH_THREADS``, default 1: see the module docstring)."""
    before = torch.get_num_threads()
    if not ON_CUDA:
        torch.set_num_threads(int(os.environ.get("TGDP_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", ["reference", "fast"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_train_step(benchmark, cpu_threads, preset, provider):
    from tgdp.flops import count_step_flops

    cfg = PRESETS[preset]()
    method = build(cfg, provider)
    step = step_fn(method, *inputs(cfg))
    benchmark.pedantic(step, warmup_rounds=1, rounds=3 if not ON_CUDA else 20, iterations=1)
    flops = count_step_flops(cfg, provider, "fast", batch=BATCH)["total"] * BATCH
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, threads=cpu_threads,
                                gflops=flops / benchmark.stats.stats.mean / 1e9)


def main(rounds: int = 3, threads: int = 1) -> None:
    if not ON_CUDA:
        torch.set_num_threads(threads)
    for name, make in PRESETS.items():
        cfg = make()
        ref = build(cfg, "reference")
        fast = build(cfg, "fast", ref.state_dict())
        data = inputs(cfg)
        steps = {"reference": step_fn(ref, *data), "fast": step_fn(fast, *data)}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for fn in steps.values():
            fn()                                          # warm-up (allocator, layouts)
        for _ in range(rounds):
            for k, fn in steps.items():                   # alternate: both see the same noise
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{name:12s} B={BATCH} {DEVICE.type} threads={torch.get_num_threads()}: "
              f"reference {med['reference'] * 1e3:8.1f} ms  fast {med['fast'] * 1e3:8.1f} ms  "
              f"speed-up {med['reference'] / med['fast']:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
