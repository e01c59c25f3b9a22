"""Warmup + cosine learning-rate schedule against hand-computed values."""

import math

import pytest
import torch

from tgdp.training.schedule import WarmupCosine, lr_at


def test_hand_values():
    # total 10, warmup 20 % -> W = 2 warmup steps; floor 0.1 * lr
    lr = 1.0
    assert lr_at(0, 10, lr, 0.2, 0.1) == pytest.approx(0.5)      # lr * 1/2
    assert lr_at(1, 10, lr, 0.2, 0.1) == pytest.approx(1.0)      # lr * 2/2
    assert lr_at(2, 10, lr, 0.2, 0.1) == pytest.approx(1.0)      # cosine starts at lr
    # step 6: progress (6-2)/8 = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_at(6, 10, lr, 0.2, 0.1) == pytest.approx(0.55)
    assert lr_at(9, 10, lr, 0.2, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_at(10, 10, lr, 0.2, 0.1) == pytest.approx(0.1)     # the floor
    assert lr_at(0, 5, 2e-4, 0.0, 0.1) == pytest.approx(2e-4)    # no warmup


def test_monotone_after_warmup():
    vals = [lr_at(s, 100, 1e-3, 0.1, 0.1) for s in range(100)]
    assert all(a < b for a, b in zip(vals[:9], vals[1:10]))
    assert all(a >= b for a, b in zip(vals[10:], vals[11:]))
    assert min(vals) >= 1e-4


@pytest.mark.parametrize("kw,match", [({"total": 0}, "total"), ({"step": -1}, "step"),
                                      ({"warmup_frac": 1.0}, "warmup_frac")])
def test_bad_args(kw, match):
    args = {"step": 0, "total": 10, "base_lr": 1.0, "warmup_frac": 0.1, "min_lr_ratio": 0.1, **kw}
    with pytest.raises(ValueError, match=match):
        lr_at(**args)


def test_scheduler_sets_lr_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=123.0)
    sch = WarmupCosine(opt, total=10, base_lr=1.0, warmup_frac=0.2, min_lr_ratio=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    for _ in range(6):
        sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)
    opt2 = torch.optim.AdamW([p], lr=123.0)
    sch2 = WarmupCosine(opt2, total=10, base_lr=1.0, warmup_frac=0.2, min_lr_ratio=0.1)
    sch2.load_state_dict(sch.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
