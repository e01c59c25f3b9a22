"""Validate the GPU paths on one H100/H200 in at most 8 minutes: compiled Triton kernels, the fast model
in bf16, DALI on the GPU, a timed 30-step paper() run; one pass/fail line per step and a JSON report.

Runs the steps of :mod:`tgdp.gpucheck` one after another, each as ``python -m tgdp.gpucheck.child``
with its own time limit inside the total budget, prints one ``PASS``/``FAIL``/``ERROR``/``TIMEOUT``/
``SKIP`` line per step and writes ``<out>/report.json`` (atomically, also after every step).
Exit status: 0 when every selected step passed, 1 otherwise, 2 for a usage error (e.g. no CUDA).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from tgdp.cli import UserError, parser, run
from tgdp.gpucheck.plan import BUDGET_S, CHECKS, MIN_START_S, PROFILES

PROG = "tgdp.gpucheck"


def _parse_limits(items: list[str]) -> dict[str, float]:
    names = [c.name for c in CHECKS]
    out = {}
    for item in items:
        name, _, sec = item.partition("=")
        try:
            val = float(sec)
        except ValueError:
            val = -1.0
        if name not in names or val <= 0:
            raise UserError(f"--limit {item!r}: expected STEP=SECONDS with STEP one of {names} and SECONDS > 0")
        out[name] = val
    return out


def _cuda_or_error(smoke: bool) -> str:
    """Device description; without CUDA (and without --cpu-smoke) a UserError in one line."""
    import torch

    if smoke:
        return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise UserError(f"needs a CUDA GPU (H100/H200) but {why} (torch {torch.__version__}); run it on a GPU "
                        f"machine, or add --cpu-smoke to run the same checks on the CPU at tiny shapes")
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def _child_env(smoke: bool) -> dict:
    """Environment of the step processes. TRITON_INTERPRET makes Triton run kernels as Python on the
    host, so the compiled sm_90 kernels this command exists to validate would never run: it is
    removed before any step process starts (this process never imports triton). --cpu-smoke sets
    it on purpose, and hides any GPU."""
    env = dict(os.environ)
    env.pop("TGDP_FORCE_TRITON", None)
    if smoke:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""        # the smoke run is a CPU run even on a GPU machine
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _run_step(check, ctx_file: Path, result_path: Path, log: Path, limit: float, env: dict) -> dict:
    """Run one step process in its own process group; at the limit, or when it is done, end that group
    (the step's DALI threads and compile workers with it)."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tgdp.gpucheck.child", check.module, str(ctx_file)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    wall = time.monotonic() - t0
    try:
        res = json.loads(result_path.read_text())
    except (OSError, ValueError):
        res = {"status": "running", "phase": "start"}
    if res.get("status") == "running":
        phase = res.get("phase", "?")
        res = {"status": "timeout" if timed_out else "error",
               "summary": (f"over its {limit:.0f} s limit while in phase '{phase}'" if timed_out else
                           f"the step process exited with status {proc.returncode} in phase '{phase}'; see {log}"),
               "details": {k: v for k, v in res.items() if k != "status"}}
    res["wall_s"] = round(wall, 2)
    return res


def _unmet(check, report: dict, only: list[str], shards: Path) -> list[str]:
    """Why a step cannot run: a step it needs failed, or was not selected and left nothing cached."""
    out = []
    for need in check.needs:
        if need in only:
            if report["steps"].get(need, {}).get("status") != "pass":
                out.append(f"needs {need}, which did not pass")
        elif not (shards / "stamp.json").exists():
            out.append(f"needs {need}: not selected, and {shards} holds none")
    return out


def _line(name: str, res: dict) -> str:
    wall = f"{res['wall_s']:6.1f} s" if "wall_s" in res else " " * 8
    return f"{res['status'].upper():7s} {name:8s} {wall}  {res.get('summary', '')}"


def _main(argv: list[str]) -> int:
    from tgdp.atomic import atomic_write_json, atomic_write_text
    from tgdp.gpucheck.common import Context

    ap = parser(PROG, __doc__.split("\n\n")[0], epilog="What each step checks and its time budget: "
                "tgdp/gpucheck/__init__.py and tgdp/gpucheck/plan.py.")
    ap.add_argument("--out", default=None, metavar="DIR", help="report folder (default: runs/gpucheck/<time>); must be new")
    ap.add_argument("--shards", default=None, metavar="DIR",
                    help="shard cache: <dir>/train and <dir>/val are generated once and reused "
                         "(default: ~/.cache/tgdp/gpucheck/<mode>)")
    ap.add_argument("--only", default=None, metavar="STEPS", help=f"comma-separated steps (default: all of {[c.name for c in CHECKS]})")
    ap.add_argument("--limit", action="append", default=None, metavar="STEP=SECONDS", help="change one step's limit")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="total seconds (default: 480 on a GPU)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="testing: run every step on the CPU at tiny shapes (Triton interpreter, SDPA, DALI CPU "
                         "operators, eager) to prove this command works; proves nothing about a GPU")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    args = ap.parse_args(argv)
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    names = [c.name for c in CHECKS]
    only = names if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in names]
    if bad or not only:
        raise UserError(f"--only {args.only!r}: unknown step(s) {bad}; choose from {names}")
    limits = _parse_limits(args.limit or [])
    budget = args.budget if args.budget is not None else BUDGET_S[mode]
    if budget <= 0:
        raise UserError(f"--budget {budget} must be > 0 seconds")
    device = _cuda_or_error(args.cpu_smoke)
    out = Path(args.out) if args.out else Path("runs/gpucheck") / time.strftime("%Y%m%d-%H%M%S")
    if (out / "report.json").exists():
        raise UserError(f"{out}/report.json exists (another run's report); choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    shards = Path(args.shards).expanduser() if args.shards else Path(f"~/.cache/tgdp/gpucheck/{mode}").expanduser()

    print(f"tgdp.gpucheck ({mode}) on {device}; budget {budget:.0f} s; report {out / 'report.json'}", flush=True)
    interpret = os.environ.get("TRITON_INTERPRET", "")
    if interpret not in ("", "0") and mode == "gpu":
        print(f"note: TRITON_INTERPRET={interpret} is not passed to the steps: it would run the Triton kernels "
              f"in the CPU interpreter and the compiled GPU kernels would go untested", flush=True)
    report = {"command": " ".join(["python -m tgdp.gpucheck", *argv]), "mode": mode, "device": device,
              "python": sys.version.split()[0], "budget_s": budget, "out": str(out), "shards": str(shards),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}}
    env = _child_env(args.cpu_smoke)
    t0 = time.monotonic()
    for check in CHECKS:
        if check.name not in only:
            continue
        left = budget - (time.monotonic() - t0)
        limit = min(limits.get(check.name, check.limit_s), left)
        unmet = _unmet(check, report, only, shards)
        if unmet:
            res = {"status": "skip", "summary": "; ".join(unmet)}
        elif left < MIN_START_S[mode]:
            res = {"status": "skip", "summary": f"no time left: {left:.0f} s of the {budget:.0f} s budget"}
        else:
            ctx = Context(mode, out.resolve(), shards.resolve(), PROFILES[mode][check.name],
                          (out / f"{check.name}.json").resolve())
            ctx_file = out / f"{check.name}.context.json"
            atomic_write_text(ctx_file, ctx.to_json())
            res = _run_step(check, ctx_file, ctx.result_path, out / f"{check.name}.log", limit, env)
            res["log"] = str(out / f"{check.name}.log")
        res.update(limit_s=round(limit, 1), estimate_s=check.estimate_s)
        report["steps"][check.name] = res
        print(_line(check.name, res), flush=True)
        report["wall_s"] = round(time.monotonic() - t0, 2)
        atomic_write_json(out / "report.json", report)
    passed = all(r["status"] == "pass" for r in report["steps"].values())
    report["passed"] = passed
    atomic_write_json(out / "report.json", report)
    n_ok = sum(r["status"] == "pass" for r in report["steps"].values())
    print(f"tgdp.gpucheck: {n_ok}/{len(report['steps'])} steps passed in {report['wall_s']:.0f} s; "
          f"report: {out / 'report.json'}", flush=True)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tgdp.gpucheck``: expected errors are one line and exit status 2."""
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
