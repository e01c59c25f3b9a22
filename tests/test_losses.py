"""InfoNCE (hand values, directions, accuracy, all-gather with autograd) and the distillation loss."""

import math
import time
import pytest
import torch
import torch.multiprocessing as mp

from tgdp.losses import distill_mse, info_nce

# a = [1, 0], [0, 1]; v = [1, 0], [3, 4] (-> [0.6, 0.8]); tau = 0.5
# S = a_hat v_hat^T / tau = [[2, 1.2], [0, 1.6]]
# video->audio (softmax over the audio axis of each column): col 1: log(1 + e^-2) = 0.1269280110429725,
#   col 2: log(1 + e^-0.4) = 0.5130152523999526 -> mean 0.31997163172146253
# audio->video (rows): log(1 + e^-0.8), log(1 + e^-1.6) -> mean 0.2775007034180582
HAND_VA = 0.31997163172146253
HAND_AV = 0.2775007034180582


def _pair():
    return torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])


def test_info_nce_hand_value_unidirectional():
    a, v = _pair()
    loss, acc = info_nce(a, v, temperature=0.5, symmetric=False)
    assert math.isclose(loss.item(), HAND_VA, rel_tol=1e-6)
    assert acc.item() == 1.0


def test_info_nce_hand_value_symmetric():
    a, v = _pair()
    loss, _ = info_nce(a * 7.0, v, temperature=0.5, symmetric=True)   # scale-free: L2-normalised inside
    assert math.isclose(loss.item(), 0.5 * (HAND_VA + HAND_AV), rel_tol=1e-6)


def test_info_nce_matches_the_official_column_formula():
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss, _ = info_nce(a, v, temperature=0.05)
    an, vn = a / a.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    s = an @ vn.t() / 0.05
    official = -torch.diag(torch.log_softmax(s, dim=0)).mean()      # softmax over audio for each video
    assert torch.allclose(loss, official, atol=1e-5)


def test_accuracy_counts_the_right_direction():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 0.2]])   # video 2 is closer to audio 1
    _, acc = info_nce(a, v, temperature=0.1)
    assert acc.item() == 0.5                       # video->audio: video 2 picks audio 1
    _, acc_sym = info_nce(a, v, temperature=0.1, symmetric=True)
    assert acc_sym.item() == 0.75                  # audio->video is 2/2 right


def test_batch_size_one_and_errors():
    loss, acc = info_nce(torch.randn(1, 4), torch.randn(1, 4), temperature=0.05)
    assert loss.item() == 0.0 and acc.item() == 1.0
    with pytest.raises(ValueError, match="emb_a"):
        info_nce(torch.randn(2, 4), torch.randn(3, 4), temperature=0.05)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(2, 4), torch.randn(2, 4), temperature=0.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_logits_stay_fp32_under_bf16_autocast(symmetric):
    """Under autocast the cosine logits are not rounded to bf16 (tau = 0.05 would amplify that):
    loss and gradients equal the fp32 computation."""
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(64, 96, generator=g), torch.randn(64, 96, generator=g)
    v = v + 0.5 * a                                   # weakly paired: loss ~ 3, logits spread over +-10
    ref_a, ref_v = a.clone().requires_grad_(), v.clone().requires_grad_()
    ref, _ = info_nce(ref_a, ref_v, 0.05, symmetric=symmetric, gather=False)
    ref.backward()
    ca, cv = a.clone().requires_grad_(), v.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc = info_nce(ca, cv, 0.05, symmetric=symmetric, gather=False)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ca.grad, ref_a.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cv.grad, ref_v.grad, rtol=1e-5, atol=1e-7)


def test_distill_hand_values():
    s_a, t_a = torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    s_v, t_v = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    # normalised: |[0.6, 0.8] - [1, 0]|^2 = 0.8 ; video rows 0 and 2 -> mean 1.0 ; total 1.8
    assert math.isclose(distill_mse(s_a, s_v, t_a, t_v, normalize=True).item(), 1.8, rel_tol=1e-6)
    # raw: |[1, 4]|^2 = 17 ; video rows 0 and (1 + 25) -> mean 13 ; total 30
    assert math.isclose(distill_mse(s_a, s_v, t_a, t_v, normalize=False).item(), 30.0, rel_tol=1e-6)


def test_distill_does_not_train_the_teacher():
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    distill_mse(s, s, t, t).backward()
    assert s.grad is not None and t.grad is None


MODES = [(sym, gather) for sym in (True, False) for gather in (True, False)]


def _worker(rank, world, init_file, a, v, out):
    import tgdp.losses as losses_mod

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        real, calls = losses_mod.gather_with_grad, []

        def counting(x):
            calls.append(x.shape)
            return real(x)

        losses_mod.gather_with_grad = counting
        b = a.shape[0] // world
        for sym, gather in MODES:
            calls.clear()
            la = a[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            lv = v[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            loss, acc = info_nce(la, lv, temperature=0.1, symmetric=sym, gather=gather)
            (loss / world).backward()   # DDP-style: every rank's loss averaged over ranks
            out[(rank, sym, gather)] = (loss.detach(), acc.detach(), la.grad, lv.grad, len(calls))
    finally:
        torch.distributed.destroy_process_group()


def test_all_gather_equals_the_full_batch_loss_and_gradients(tmp_path):
    """2 gloo ranks with half the batch each, per direction (symmetric / video->audio) and with or
    without gather: with gather == one process with the whole batch (loss and grads), and only the
    keys the direction uses are gathered (audio for video->audio; audio and video when symmetric);
    without gather == each rank's own local loss, and nothing is gathered."""
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    world, b = 2, 3
    with mp.Manager() as manager:
        out = manager.dict()
        # spawn, not fork: forking a process whose torch thread pools are live can deadlock.
        ctx = mp.spawn(_worker, args=(world, str(tmp_path / "pg"), a, v, out), nprocs=world, join=False)
        deadline = time.monotonic() + 120                # never hang the suite on a stuck rank
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail("distributed InfoNCE ranks did not finish within 120 s")
        res = dict(out)
    for sym, gather in MODES:
        got = [res[(r, sym, gather)] for r in range(world)]
        assert [x[4] for x in got] == [(2 if sym else 1) if gather else 0] * world, (sym, gather)
        ga, gv = torch.cat([x[2] for x in got]), torch.cat([x[3] for x in got])
        if gather:
            fa, fv = a.clone().requires_grad_(True), v.clone().requires_grad_(True)
            full, full_acc = info_nce(fa, fv, temperature=0.1, symmetric=sym, gather=gather)
            full.backward()
            mean_loss = sum(x[0] for x in got) / world
            mean_acc = sum(x[1] for x in got) / world
            assert torch.allclose(mean_loss, full, atol=1e-6) and torch.allclose(mean_acc, full_acc)
            want_a, want_v = fa.grad, fv.grad
        else:
            want_a, want_v = [], []
            for r in range(world):
                la = a[r * b:(r + 1) * b].clone().requires_grad_(True)
                lv = v[r * b:(r + 1) * b].clone().requires_grad_(True)
                local, _ = info_nce(la, lv, temperature=0.1, symmetric=sym, gather=False)
                assert torch.allclose(got[r][0], local, atol=1e-6)
                (local / world).backward()
                want_a.append(la.grad)
                want_v.append(lv.grad)
            want_a, want_v = torch.cat(want_a), torch.cat(want_v)
        assert torch.allclose(ga, want_a, atol=1e-6) and torch.allclose(gv, want_v, atol=1e-6), (sym, gather)
    # the directions really differ (the comparison above is not between equal numbers)
    assert not torch.allclose(res[(0, True, True)][0], res[(0, False, True)][0])
