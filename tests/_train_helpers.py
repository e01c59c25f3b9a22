"""Shared settings of the training tests: shrunk tiny() shapes on the noise source."""

import json
import os
import subprocess
import sys
from pathlib import Path

SMALL = ["--preset", "tiny", "--data.root", "random", "--model.depth", "2", "--model.modality_specific_depth", "1",
         "--model.img_size", "32", "--model.audio_length", "64", "--model.decoder_depth", "1",
         "--train.batch_size", "4", "--train.model_impl", "auto", "--train.log_every", "1",
         "--data.num_workers", "0"]

SMALL_DICT = {SMALL[i][2:]: SMALL[i + 1] for i in range(2, len(SMALL), 2)}

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return e


def run_train(args: list[str], nproc: int = 1, timeout: float = 240, check: bool = True):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tgdp.train", *args]
    else:
        cmd = [sys.executable, "-m", "tgdp.train", *args]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def losses(out_dir, key: str = "loss") -> dict[int, float]:
    """step -> value from metrics.jsonl; a resumed run's rows replace the earlier ones."""
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if line.strip()]
    return {r["step"]: r[key] for r in rows}
