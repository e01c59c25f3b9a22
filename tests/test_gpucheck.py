"""python -m tgdp.gpucheck: the CPU refusal, the step runner (limits, isolation), and the whole command
end to end under --cpu-smoke (every step's real code at tiny shapes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tgdp.gpucheck import CHECKS, PROFILES
from tgdp.gpucheck.__main__ import _child_env, _run_step
from tgdp.gpucheck.common import Context
from tgdp.gpucheck.plan import BUDGET_S, Check

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "tgdp.gpucheck", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cpu_machine_says_it_needs_cuda_in_one_line(tmp_path):
    p = _cli("--out", str(tmp_path / "r"))
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("tgdp.gpucheck: error: needs a CUDA GPU")
    assert "--cpu-smoke" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()          # nothing written before the refusal


@pytest.mark.parametrize("args, needle", [
    (["--only", "kernels,nope"], "unknown step(s) ['nope']"),
    (["--limit", "train=-1"], "--limit 'train=-1'"),
    (["--limit", "bogus=3"], "--limit 'bogus=3'"),
    (["--budget", "0"], "--budget 0"),
])
def test_usage_errors_are_one_line(args, needle):
    p = _cli("--cpu-smoke", *args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr


def test_refuses_to_overwrite_a_report(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    p = _cli("--cpu-smoke", "--out", str(tmp_path))
    assert p.returncode == 2 and "report.json exists" in p.stderr
    assert (tmp_path / "report.json").read_text() == "{}"


def test_budget_skips_what_cannot_start_and_the_report_says_why(tmp_path):
    p = _cli("--cpu-smoke", "--budget", "3", "--out", str(tmp_path / "r"), "--shards", str(tmp_path / "s"))
    assert p.returncode == 1
    lines = [ln for ln in p.stdout.splitlines() if ln.split(" ")[0] in STATUSES]
    assert [ln.split()[1] for ln in lines] == [c.name for c in CHECKS]
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["passed"] is False and rep["budget_s"] == 3
    assert rep["steps"]["kernels"]["status"] == "skip" and "no time left" in rep["steps"]["kernels"]["summary"]
    assert "needs shards" in rep["steps"]["data"]["summary"]


def test_a_step_whose_input_was_not_selected_is_skipped_with_the_reason(tmp_path):
    p = _cli("--cpu-smoke", "--only", "data", "--out", str(tmp_path / "r"), "--shards", str(tmp_path / "none"))
    assert p.returncode == 1
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(rep["steps"]) == ["data"] and rep["steps"]["data"]["status"] == "skip"
    assert "not selected" in rep["steps"]["data"]["summary"]


def test_step_environment_handles_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TGDP_FORCE_TRITON", "1")
    gpu = _child_env(smoke=False)
    assert "TRITON_INTERPRET" not in gpu and "TGDP_FORCE_TRITON" not in gpu
    smoke = _child_env(smoke=True)
    assert smoke["TRITON_INTERPRET"] == "1" and smoke["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_step_refuses_to_run_under_the_interpreter(tmp_path, monkeypatch):
    from tgdp.gpucheck import child

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ctx = Context("gpu", tmp_path, tmp_path / "s", {}, tmp_path / "kernels.json")
    (tmp_path / "ctx.json").write_text(ctx.to_json())
    assert child.main(["tgdp.gpucheck.kernels_check", str(tmp_path / "ctx.json")]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert res["status"] == "error" and "TRITON_INTERPRET is set" in res["summary"]


STEPS = '''
import os, sys, time
def slow(ctx):
    open(os.path.join(str(ctx.out), "pid"), "w").write(str(os.getpid()))
    ctx.progress("sleeping")
    time.sleep(60)
def boom(ctx):
    raise ValueError("broken on purpose")
def dies(ctx):
    os._exit(3)
def fine(ctx):
    return {"status": "pass", "summary": "ok", "details": {}}
'''


@pytest.mark.parametrize("func, status, needle", [
    ("slow", "timeout", "over its 3 s limit while in phase 'sleeping'"),
    ("boom", "error", "ValueError: broken on purpose"),
    ("dies", "error", "exited with status 3"),
    ("fine", "pass", "ok"),
])
def test_each_step_is_isolated_and_limited(tmp_path, func, status, needle):
    (tmp_path / "fake_steps.py").write_text(STEPS)
    ctx = Context("cpu-smoke", tmp_path, tmp_path / "s", {}, tmp_path / "res.json")
    (tmp_path / "ctx.json").write_text(ctx.to_json())
    env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    t0 = time.monotonic()
    res = _run_step(Check(func, f"fake_steps:{func}", 1, 3), tmp_path / "ctx.json", ctx.result_path,
                    tmp_path / "log", 3.0, env)
    assert res["status"] == status and needle in res["summary"]
    assert time.monotonic() - t0 < 30
    if func == "slow":
        pid = int((tmp_path / "pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)                         # the step's process (group) was killed


def test_plan_fits_eight_minutes():
    assert sum(c.limit_s for c in CHECKS) <= BUDGET_S["gpu"] == 480
    assert all(c.estimate_s < c.limit_s for c in CHECKS)
    assert set(PROFILES["gpu"]) == set(PROFILES["cpu-smoke"]) == {c.name for c in CHECKS}
    train = PROFILES["gpu"]["train"]
    assert train["steps"] == 30 and train["batch"] == 64 and train["preset"] == "paper"
    assert train["overrides"]["train.compile"] and train["overrides"]["train.cuda_graphs"]
    assert train["overrides"]["model.attn_backend"] == "flash"
    assert PROFILES["gpu"]["kernels"] == {"preset": "paper", "batch": 256}


def test_cpu_smoke_end_to_end(tmp_path):
    """The command's real code, every step, on the CPU: pass/fail lines and the JSON report."""
    out, shards = tmp_path / "run", tmp_path / "shards"
    p = _cli("--cpu-smoke", "--out", str(out), "--shards", str(shards))
    lines = [ln for ln in p.stdout.splitlines() if ln.split(" ")[0] in STATUSES]
    assert [ln.split()[1] for ln in lines] == [c.name for c in CHECKS], p.stdout + p.stderr
    rep = json.loads((out / "report.json").read_text())
    steps = rep["steps"]
    assert rep["mode"] == "cpu-smoke" and list(steps) == [c.name for c in CHECKS]
    for name in ("kernels", "model", "shards", "data"):
        assert steps[name]["status"] == "pass", (name, steps[name])
        assert steps[name]["wall_s"] <= steps[name]["limit_s"]
    k = steps["kernels"]["details"]
    assert k["interpreter"] is True and {c["op"] for c in k["cases"]} == {"patch_global_scores", "topk_visible",
                                                                          "masked_mse"}
    assert {c["dtype"] for c in k["cases"]} == {"float32", "bfloat16"} and all(c["ok"] for c in k["cases"])
    m = steps["model"]["details"]
    assert m["attention_backend"] == "sdpa" and sum(r["name"].startswith("grad.") for r in m["rows"]) > 50
    d = steps["data"]["details"]
    assert d["rows"] == PROFILES["cpu-smoke"]["shards"]["n_val"] and d["audio_max_diff"] == 0.0
    assert d["placement"] == ["audio:cpu", "frames:cpu"] and d["train_batch_ok"]
    # train: the figures are measured, and the verdict follows them (pass exactly when train_step has
    # no host sync and every loss is finite); the hot path is sync-free, so it passes
    t = steps["train"]
    assert t["status"] == "pass", t
    td = t["details"]
    assert td["samples_per_s"] > 0 and td["loader"] == "dali" and td["host_masks"] is True
    assert td["mfu"] is None and td["peak_memory_bytes"] is None          # CPU: no peak, no CUDA memory
    syncs = td["host_syncs_per_step"]["train_step_guard"]
    assert (t["status"] == "pass") == (syncs == 0 and td["mean_loss"] == td["mean_loss"])
    assert ("host syncs/step" in t["summary"]) and ("samples/s" in t["summary"])
    assert p.returncode == 0 and rep["passed"] is True
    assert f"steps passed" in p.stdout.splitlines()[-1]
