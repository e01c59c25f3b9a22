"""``python -m tgdp.gpucheck``: one command that validates the GPU paths on one H100/H200 in <= 8 minutes.

Steps, in order, each in its own process with its own time limit (a crash, a hang or a poisoned
CUDA context in one cannot stop the others), one pass/fail line each, and a JSON report:

==========  =====================================================================================
kernels     the compiled Triton kernels (sm_90, never the interpreter) against the plain-torch
            reference at ``paper()`` shapes (batch 256), fp32 (<= 1e-5) and bf16 (<= 2 x plain
            torch's bf16 error against fp32 + 1e-5), forward and backward
model       the fast model (FlashAttention, fused ops) against the reference model in bf16
            autocast: every loss, teacher score, prediction, embedding and parameter gradient
            within 2 x the error plain torch makes in bf16 against the fp32 reference
shards      generated webdataset shards (:func:`tgdp.data.synthetic.ensure_demo`, which runs
            :func:`tgdp.prepare.prepare`), cached between runs
data        the DALI pipeline (nvJPEG ``"mixed"`` decoder, GPU log-Mel) against the torch loader
            on those shards: same clips, frames, audio windows, valid audio columns
train       30 ``paper()`` steps (batch 64) with FlashAttention + ``torch.compile`` + CUDA graphs
            + DALI + host-packed masks: samples/s, MFU, peak memory, host syncs per step
==========  =====================================================================================

On a machine without CUDA the command says so in one line and exits 2. ``--cpu-smoke`` runs the
same check code on the CPU at tiny shapes (Triton interpreter, SDPA attention, DALI CPU operators,
eager) so CI proves the command itself works; see :mod:`tgdp.gpucheck.plan` for the time budget.
"""

from tgdp.gpucheck.plan import CHECKS, PROFILES

__all__ = ["CHECKS", "PROFILES"]
