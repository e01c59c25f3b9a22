"""How long tracing the ``paper()`` training step for ``torch.compile`` takes (the backend-independent
part of compiling it): Dynamo + AOTAutograd with the ``aot_eager`` backend on meta tensors (no
compute), forward then backward, batch 2. Used to budget ``python -m tgdp.gpucheck``'s "train" step
(``tgdp/gpucheck/plan.py``). Run: ``/usr/bin/time -v python benchmarks/trace_paper_step.py``
(CPU seconds = user time; the wall time depends on what else the machine runs).
"""

import sys
import time

import torch

from tgdp.configs import PRESETS
from tgdp.masking import Masks, random_masks
from tgdp.method import TGDP
from tgdp.model.fast import FastCAVMAESync


def main(preset: str = "paper", batch: int = 2) -> None:
    cfg = PRESETS[preset]()
    m = cfg.model
    method = TGDP(cfg, FastCAVMAESync(m, device="meta"), check_finite=False)

    def masks(n, ratio, seed):
        x = random_masks(batch, n, ratio, torch.Generator().manual_seed(seed))
        return Masks(x.ids_keep.to("meta"), x.ids_restore.to("meta"), x.mask.to("meta"))

    rec = (masks(m.num_patches_a, cfg.masking.rec_ratio, 0), masks(m.num_patches_v, cfg.masking.rec_ratio, 1))
    con = (masks(m.num_patches_a, cfg.masking.con_ratio, 2), masks(m.num_patches_v, cfg.masking.con_ratio, 3))
    audio = torch.zeros(batch, m.audio_length, m.n_mels, device="meta")
    frames = torch.zeros(batch, m.in_chans, m.img_size, m.img_size, device="meta")
    step = torch.compile(method, backend="aot_eager")
    t0 = time.perf_counter()
    out = step(audio, frames, masks_rec=rec, masks_con=con)
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    print(f"{preset}: trace + forward {t1 - t0:.1f} s, backward {t2 - t1:.1f} s (wall)")


if __name__ == "__main__":
    main(*sys.argv[1:2])
