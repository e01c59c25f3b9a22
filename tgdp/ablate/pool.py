"""Run the (variant, seed) runs of a study: one after another in this process, or ``jobs`` at once.

With ``jobs > 1`` every run is a child process (``python -m tgdp.ablate.runner RUN_DIR``, output in
``RUN_DIR/ablate.log``) with ``OMP_NUM_THREADS = cores // jobs`` unless the caller set it: on a
2-core machine two single-threaded runs avoid the intra-op thread synchronisation that a loaded
machine turns into long waits (measured under load: 2 threads ran 10x slower than 1). The parent
locks each run folder while its child works and stops the children if it is interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence

from tgdp.ablate.runner import RunSpec, Study, acquire, prepare, run_one, worker_command
from tgdp.atomic import atomic_write_json
from tgdp.cli import UserError

__all__ = ["run_all"]

# on_done(spec, result, ran, started_at)
Callback = Callable[[RunSpec, dict, bool, float], None]


def run_all(study: Study, specs: Sequence[RunSpec], on_done: Callback, jobs: int = 1, device: str = "cpu",
            on_start: Callable[[RunSpec, str], None] | None = None) -> None:
    if jobs <= 1:
        for spec in specs:
            t0 = time.perf_counter()
            if on_start is not None:
                on_start(spec, "")
            result, ran = run_one(study, spec, device=device)
            on_done(spec, result, ran, t0)
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending, running, failed = list(specs), {}, []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                spec = pending.pop(0)
                _, rdir, fp, done = prepare(study, spec)
                if done is not None:
                    on_done(spec, done, False, time.perf_counter())
                    continue
                lock = acquire(rdir)
                atomic_write_json(rdir / "ablate_run.json", fp)     # what the child reads
                log = open(rdir / "ablate.log", "a")
                proc = subprocess.Popen(worker_command(rdir, study.torchrun, device), stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                running[proc] = (spec, rdir, lock, log, time.perf_counter())
                if on_start is not None:
                    on_start(spec, str(rdir / "ablate.log"))
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                spec, rdir, lock, log, t0 = running.pop(proc)
                log.close()
                lock.unlink(missing_ok=True)
                if proc.returncode == 0 and (rdir / "result.json").is_file():
                    on_done(spec, json.loads((rdir / "result.json").read_text()), True, t0)
                else:
                    lines = (rdir / "ablate.log").read_text(errors="replace").strip().splitlines()
                    failed.append(f"{spec.variant.name} seed {spec.seed} (exit {proc.returncode}: "
                                  f"{(lines[-1] if lines else '')[:200]}; log {rdir / 'ablate.log'})")
    finally:
        for proc, (_, _, lock, log, _) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
            lock.unlink(missing_ok=True)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {failed[0]}; fix the cause and rerun the same command "
                        "(finished runs are kept)")
