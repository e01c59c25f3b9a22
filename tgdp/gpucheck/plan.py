"""What each gpucheck step runs, at which sizes, and how long it may take.

Time budget on one H100/H200 (8 minutes in all; every limit includes the step's process start,
~5 s for ``import torch`` + CUDA context). Estimates come from counted FLOPs (GPU compute is
negligible for every step but ``train``) and compile times:

========  ========  =====  ========================================================================
step      estimate  limit  how it was estimated
========  ========  =====  ========================================================================
kernels   40 s      75 s   Triton compiles each kernel variant once: 6 op/direction variants x 2
                           dtypes x fwd/bwd ~ 20 compiles; all 72 variants compile ahead of time in
                           ~30 s on 2 CPU cores (AOT guard), so ~10-20 s; the largest reference at
                           batch 256, the fp64 explicit score map, is 17 GFLOP / 1 GB: milliseconds.
model     25 s      60 s   3 fwd+bwd passes of ``paper()`` at batch 8: 3 x 8 x 331 GFLOP = 8 TFLOP,
                           < 1 s even at fp32 CUDA-core speed (~50 TFLOP/s); the rest is CUDA,
                           cuBLAS and FlashAttention start-up.
shards    20 s      60 s   512 + 64 synthetic clips; ``ensure_demo`` made 6 clips in 2.5 s on one
                           CPU core (imports included), so ~0.3 s per clip per core: ~12 s on 16.
data      20 s      45 s   64 clips through each loader: the torch loader's CPU fbank + JPEG decode
                           is ~0.1 s per clip on one core; two DALI pipeline builds.
train     200 s     240 s  30 steps x 64 samples x 320 GFLOP = 615 TFLOP: ~3 s at 25 % MFU. The
                           rest is compiling: tracing the paper step (Dynamo + AOTAutograd, the
                           backend-independent part) took 41 s of CPU time on this project's
                           2-core box (``/usr/bin/time python benchmarks/trace_paper_step.py``);
                           Inductor's lowering and Triton codegen (parallel compile workers) is
                           budgeted at up to 3x that, plus CUDA-graph capture, the loader start,
                           the FLOP and roofline counts (~10 s) and two eager guard steps.
========  ========  =====  ========================================================================

Sum of the limits: 480 s = 8 minutes. A step that would start with less than ``MIN_START_S``
left is skipped with that reason; ``--limit STEP=SECONDS`` changes one limit and ``--budget`` the
total. ``cpu-smoke`` runs the same code at tiny shapes (28 s of CPU time in all).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Check", "CHECKS", "PROFILES", "BUDGET_S", "MIN_START_S"]


@dataclass(frozen=True)
class Check:
    name: str
    module: str          # tgdp.gpucheck.<module>.run(ctx) -> {"status", "summary", "details"}
    estimate_s: float
    limit_s: float
    needs: tuple[str, ...] = ()   # steps whose success this one needs (else: skipped, with the reason)


CHECKS = (
    Check("kernels", "tgdp.gpucheck.kernels_check", 40, 75),
    Check("model", "tgdp.gpucheck.model_check", 25, 60),
    Check("shards", "tgdp.gpucheck.data_check:make_shards", 20, 60),
    Check("data", "tgdp.gpucheck.data_check", 20, 45, needs=("shards",)),
    Check("train", "tgdp.gpucheck.train_check", 200, 240, needs=("shards",)),
)

BUDGET_S = {"gpu": 480.0, "cpu-smoke": 600.0}
MIN_START_S = {"gpu": 20.0, "cpu-smoke": 5.0}

# tiny() with 32 audio and 4 video patches (the loaders always give 128 mel bins): the smoke
# run's model; the check code is the same
MICRO = {"model.audio_length": 64, "model.img_size": 32}

# Sizes per mode. "gpu" = what the command validates; "cpu-smoke" = the same code at tiny shapes.
PROFILES = {
    "gpu": {
        "kernels": {"preset": "paper", "batch": 256},
        "model": {"preset": "paper", "batch": 8},
        "shards": {"n_train": 512, "n_val": 64},
        # audio: the GPU log-Mel runs its FFT in float32, the CPU one in float64: <= 2.1e-3 (normalised)
        # on real sounds (tgdp/data/fbank.py); frames: nvJPEG vs libjpeg-turbo IDCT/upsampling
        "data": {"batch": 16, "audio_tol": 1e-2, "frame_tol_max": 0.25, "frame_tol_mean": 0.01},
        "train": {"preset": "paper", "batch": 64, "steps": 30, "timed_from": 10, "guard_steps": 2,
                  "overrides": {"train.compile": True, "train.cuda_graphs": True, "model.attn_backend": "flash",
                                "train.precision": "bf16"}},
    },
    "cpu-smoke": {
        "kernels": {"preset": "tiny", "batch": 2, "model_overrides": MICRO},
        "model": {"preset": "tiny", "batch": 2, "model_overrides": MICRO},
        "shards": {"n_train": 4, "n_val": 2},
        "data": {"batch": 2, "audio_tol": 1e-6, "frame_tol_max": 1e-5, "frame_tol_mean": 1e-6},
        "train": {"preset": "tiny", "batch": 2, "steps": 3, "timed_from": 1, "guard_steps": 1, "model_overrides": MICRO,
                  "overrides": {"train.compile": False, "train.cuda_graphs": False, "model.attn_backend": "sdpa",
                                "train.precision": "fp32"}},
    },
}
