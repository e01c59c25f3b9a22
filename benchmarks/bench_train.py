"""Training-step throughput (opt-in: ``pytest benchmarks/bench_train.py``).

Parametrized over model implementation (reference / fast) x shapes (tiny, a 2-layer slice of paper)
x precision; on CUDA also torch.compile and CUDA graphs (reduce-overhead). Records samples/s and
achieved TFLOP/s (counted FLOPs, tgdp.perf) in ``benchmark.extra_info``; MFU where the GPU's peak
is known. The step includes the teacher forward, both student paths, backward, AdamW and the EMA.
"""

import pytest
import torch

from tgdp.configs import apply_overrides, paper, tiny
from tgdp.perf import train_flops_per_sample
from tgdp.training.distributed import DistInfo
from tgdp.training.logger import peak_flops
from tgdp.training.loop import train_step
from tgdp.training.trainer import Trainer

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

SHAPES = {
    "tiny": (tiny, {"train.batch_size": 8}),
    "paper-2layer": (paper, {"model.depth": 2, "model.modality_specific_depth": 1, "model.decoder_depth": 1,
                             "train.batch_size": 8 if CUDA else 2}),
}
MODES = [("eager", {})]
if CUDA:
    MODES += [("compile", {"train.compile": True}),
              ("cuda_graphs", {"train.compile": True, "train.cuda_graphs": True})]


@pytest.mark.parametrize("mode,mode_over", MODES, ids=[m for m, _ in MODES])
@pytest.mark.parametrize("precision", ["fp32", "bf16"] if CUDA else ["fp32"])
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_step(benchmark, tmp_path, shape, impl, precision, mode, mode_over):
    preset, over = SHAPES[shape]
    cfg = apply_overrides(preset(), {**over, **mode_over, "data.root": "random", "train.steps": 1000,
                                     "train.model_impl": impl, "train.precision": precision,
                                     "train.out_dir": str(tmp_path)}).validate()
    tr = Trainer(cfg, DistInfo(0, 1, 0, DEV), progress=False)
    batch = tr.source.next()
    step = [0]

    def run():
        train_step(tr.state, batch, step[0])
        step[0] += 1
        if CUDA:
            torch.cuda.synchronize()

    for _ in range(3):   # warm-up (compile, graph capture)
        run()
    benchmark.pedantic(run, rounds=5 if not CUDA else 20, iterations=1)
    sps = cfg.train.batch_size / benchmark.stats.stats.mean
    flops = train_flops_per_sample(cfg)["total"]
    benchmark.extra_info.update(samples_per_s=sps, tflops_per_s=flops * sps / 1e12)
    peak = peak_flops(DEV)
    if peak:
        benchmark.extra_info["mfu"] = flops * sps / peak
