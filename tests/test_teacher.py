"""EMA teacher: frozen deep copy, exact update m*t + (1-m)*s, buffers copied, momentum schedule."""

import math

import pytest
import torch
from torch import nn

from tgdp.configs import TeacherConfig
from tgdp.teacher import EMATeacher, momentum_at


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(3, 4, dtype=dtype)
        self.register_buffer("table", torch.zeros(2, dtype=dtype))


def test_teacher_is_a_frozen_eval_copy():
    s = Net()
    t = EMATeacher(s)
    assert all(not p.requires_grad for p in t.parameters()) and not t.module.training
    t.train()
    assert not t.training and not t.module.training            # stays in eval
    with torch.no_grad():
        s.lin.weight.add_(1.0)
    assert not torch.equal(t.module.lin.weight, s.lin.weight)   # a copy, not shared storage


def test_update_is_exact_on_dyadic_values():
    s = Net()
    t = EMATeacher(s)
    with torch.no_grad():
        t.module.lin.weight.fill_(1.0)
        s.lin.weight.fill_(2.0)
        s.table.fill_(3.0)
    t.update(s, 0.75)
    assert torch.all(t.module.lin.weight == 1.25)              # 0.75 * 1 + 0.25 * 2, exactly
    assert torch.all(t.module.table == 3.0)                    # buffers are copied


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.999, 1.0])
def test_update_equals_formula(m):
    torch.manual_seed(1)
    s = Net(torch.float64)
    t = EMATeacher(s)
    with torch.no_grad():
        for p in t.module.parameters():
            p.copy_(torch.randn_like(p))
    before = [p.clone() for p in t.module.parameters()]
    t.update(s, m)
    for tb, tp, sp in zip(before, t.module.parameters(), s.parameters()):
        assert torch.allclose(tp, m * tb + (1 - m) * sp, rtol=0, atol=1e-15)
        assert tp.grad is None and sp.grad is None


def test_update_rejects_bad_momentum_and_mismatched_models():
    s = Net()
    t = EMATeacher(s)
    with pytest.raises(ValueError, match="momentum"):
        t.update(s, 1.5)
    with pytest.raises(ValueError, match="parameters"):
        t.update(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), 0.5)


def test_momentum_schedules():
    const = TeacherConfig(momentum=0.99)
    assert momentum_at(const, 0, 100) == momentum_at(const, 77, 100) == 0.99
    cos = TeacherConfig(momentum=0.99, schedule="cosine", momentum_end=1.0)
    assert math.isclose(momentum_at(cos, 0, 100), 0.99)
    assert math.isclose(momentum_at(cos, 50, 100), 0.995)
    assert math.isclose(momentum_at(cos, 100, 100), 1.0)
    assert momentum_at(cos, 25, 100) < momentum_at(cos, 75, 100)
    with pytest.raises(ValueError, match="total_steps"):
        momentum_at(cos, 0, 0)
