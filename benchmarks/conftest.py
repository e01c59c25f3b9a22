"""Opt-in benchmarks: ``pytest benchmarks/`` (the default ``pytest`` run collects ``tests/`` only).

Files are named ``bench_<topic>.py`` (for the ops, the stem of ``kernels/<op>.py``) and collected by
the hook below. For the fused ops this file also provides the shared axes as generated parameters
(``op_batch``, ``op_dtype``, ``op_provider``, ``op_mode``: a bench test asks for them by name) and
the fixtures ``device``, ``pick`` and ``timed``:

- providers: on CUDA the fused Triton path (``tgdp.ops``) vs the plain-torch reference; on CPU the
  reference vs a ``torch.compile``'d reference (the Triton interpreter is far too slow to time);
- ``TGDP_BENCH_BATCH=4,8`` overrides the paper batch sizes (a quick smoke run),
  ``TGDP_BENCH_ROUNDS`` the number of timed rounds.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()


def _batches() -> list[int]:
    env = os.environ.get("TGDP_BENCH_BATCH")
    if env:
        return [int(b) for b in env.split(",")]
    return [64, 256] if ON_CUDA else [64]          # paper range; one size on a CPU box


AXES = {
    "op_batch": _batches(),
    "op_dtype": [torch.bfloat16, torch.float32] if ON_CUDA else [torch.float32],
    "op_provider": ["fused", "reference"] if ON_CUDA else ["reference", "compiled_reference"],
    "op_mode": ["fwd", "bwd", "fwd+bwd"],
}


def pytest_collect_file(parent, file_path):
    # A file named on the command line is already collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    for name, values in AXES.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[str(v).replace("torch.", "") for v in values])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_CUDA else "cpu")       # chosen once, here


@pytest.fixture
def pick():
    """pick(provider, fused, reference) -> the callable that provider times."""
    def choose(provider: str, fused, reference):
        if provider == "fused":
            return fused
        if provider == "reference":
            return reference
        return torch.compile(reference, dynamic=False)
    return choose


@pytest.fixture
def timed(benchmark, device):
    """timed(fn, nbytes=..., flops=...): time fn() (synchronised on CUDA) and record throughput.

    ``nbytes`` is the op's minimum memory traffic (inputs read once, outputs written once), the same
    figure for every provider, so GB/s compares providers as effective bandwidth.
    """
    rounds = int(os.environ.get("TGDP_BENCH_ROUNDS", 50 if ON_CUDA else 5))

    def run(fn, *, nbytes: int, flops: int = 0):
        def target():
            out = fn()
            if ON_CUDA:
                torch.cuda.synchronize()     # kernels are async: time their completion
            return out

        benchmark.pedantic(target, warmup_rounds=2, rounds=rounds, iterations=1)
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update(device=str(device), bytes=nbytes, gbps=nbytes / mean / 1e9)
        if flops:
            benchmark.extra_info["tflops"] = flops / mean / 1e12

    return run
