"""torchrun on CPU over gloo: DDP and FSDP2 losses equal a single-process run with the same global batch."""

import pytest

from _train_helpers import SMALL, losses, run_train

pytestmark = pytest.mark.dist

STEPS = 20


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process reference runs, per model implementation (auto = the packed fast model)."""
    runs = {}

    def get(impl: str):
        if impl not in runs:
            out = tmp_path_factory.mktemp(f"single-{impl}")
            run_train([*SMALL, "--train.steps", str(STEPS), "--train.out_dir", str(out), "--train.model_impl", impl])
            runs[impl] = losses(out), losses(out, "acc"), losses(out, "loss_con")
        return runs[impl]
    return get


# FSDP2 shards both models per block (the fast model calls its blocks as modules); DDP runs without
# find_unused_parameters (the unused official LayerNorm pairs are left out of it).
@pytest.mark.parametrize("dist,impl", [("ddp", "auto"), ("fsdp2", "auto"), ("fsdp2", "reference")])
def test_two_ranks_match_single_process(tmp_path, single, dist, impl):
    run_train([*SMALL, "--train.steps", str(STEPS), "--train.out_dir", str(tmp_path), "--train.dist", dist,
               "--train.model_impl", impl], nproc=2)
    ref, ref_acc, ref_con = single(impl)
    got, acc, con = losses(tmp_path), losses(tmp_path, "acc"), losses(tmp_path, "loss_con")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in ref:
        # the contrastive loss uses negatives gathered from both ranks, so it equals the global one
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), (s, got[s], ref[s])
        assert con[s] == pytest.approx(ref_con[s], rel=1e-4, abs=1e-5)
        assert acc[s] == pytest.approx(ref_acc[s], abs=1e-6)
    assert ref[STEPS] != ref[1]   # the run trained (the comparison is not between constants)


def test_fsdp2_bf16_fast_model_within_the_bf16_budget(tmp_path):
    """FSDP2 with the bf16 MixedPrecisionPolicy on the fast model (per-block units), 2 ranks, against
    one fp32 process: within twice the error bf16 autocast makes against the same fp32 run. lr ~ 0,
    so every step is a forward at the same weights (bf16 rounding then compared per batch, not
    amplified by diverging training)."""
    base = [*SMALL, "--train.steps", "4", "--train.lr", "1e-12", "--train.model_impl", "fast"]
    runs = {"fp32": ([], 1), "autocast": (["--train.precision", "bf16"], 1),
            "fsdp_bf16": (["--train.dist", "fsdp2", "--train.fsdp_bf16", "true"], 2)}
    got = {}
    for name, (extra, nproc) in runs.items():
        run_train([*base, "--train.out_dir", str(tmp_path / name), *extra], nproc=nproc)
        got[name] = {k: losses(tmp_path / name, k) for k in ("loss", "loss_rec", "loss_con")}
    ref = got["fp32"]
    for key in ("loss", "loss_rec", "loss_con"):
        err = {n: max(abs(got[n][key][s] - ref[key][s]) for s in ref[key]) for n in ("autocast", "fsdp_bf16")}
        assert sorted(got["fsdp_bf16"][key]) == [1, 2, 3, 4]
        assert 0 < err["fsdp_bf16"] <= 2 * err["autocast"] + 1e-4, (key, err)   # bf16 really ran


@pytest.mark.slow
def test_must_show_command_on_demo_data(tmp_path):
    """``torchrun --nproc_per_node=2 -m tgdp.train --demo --train.steps 20`` on the real demo set
    (generated if missing; the report on rank 0), DDP and FSDP2, against one process: the cached demo
    source indexes the global batch by step, so the losses match here too."""
    base = ["--demo", "--train.steps", "20", "--train.log_every", "5"]
    run_train([*base, "--train.out_dir", str(tmp_path / "single")], timeout=1800)
    ref = losses(tmp_path / "single")
    assert sorted(ref) == [5, 10, 15, 20]
    for dist in ("ddp", "fsdp2"):
        run_train([*base, "--train.out_dir", str(tmp_path / dist), "--train.dist", dist], nproc=2, timeout=1800)
        got = losses(tmp_path / dist)
        for s in ref:
            assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), (dist, s)
