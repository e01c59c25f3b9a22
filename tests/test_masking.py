"""Masks: counts, inverse permutation, official random order, guided top-k in patch-index space."""

import pytest
import torch

from tgdp.masking import Masks, guided_masks, num_keep, official_compat_ranks, random_masks


def _check_consistent(m: Masks, n: int, k: int) -> None:
    b = m.ids_keep.shape[0]
    assert m.ids_keep.shape == (b, k) and m.ids_restore.shape == (b, n) and m.mask.shape == (b, n)
    assert m.ids_keep.dtype == m.ids_restore.dtype == torch.int64 and m.mask.dtype == torch.float32
    for row in range(b):
        restore = m.ids_restore[row]
        assert sorted(restore.tolist()) == list(range(n))              # a permutation
        # ids_restore inverts ids_keep: the patch kept j-th sits at shuffled position j.
        assert restore[m.ids_keep[row]].tolist() == list(range(k))
        mask = m.mask[row]
        assert mask.sum() == n - k and mask[m.ids_keep[row]].sum() == 0  # 1 = removed
        assert ((restore >= k).float() == mask).all()


@pytest.mark.parametrize("n, ratio, k", [(208, 0.75, 52), (196, 0.75, 49), (208, 0.5, 104), (196, 0.5, 98)])
def test_counts_and_inverse(n, ratio, k):
    assert num_keep(n, ratio) == k
    g = torch.Generator().manual_seed(1)
    m = random_masks(3, n, ratio, g)
    _check_consistent(m, n, k)


def test_random_masks_match_official_argsort_of_noise():
    b, n, ratio = 2, 208, 0.75
    m = random_masks(b, n, ratio, torch.Generator().manual_seed(7))
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(7))
    ids_shuffle = torch.argsort(noise, dim=1)
    k = 52
    assert torch.equal(m.ids_keep, ids_shuffle[:, :k])                 # same tokens, same order
    assert torch.equal(m.ids_restore, torch.argsort(ids_shuffle, dim=1))
    official_mask = torch.ones(b, n)
    official_mask[:, :k] = 0
    assert torch.equal(m.mask, torch.gather(official_mask, 1, m.ids_restore))


def test_random_masks_follow_the_generator():
    a = random_masks(2, 50, 0.5, torch.Generator().manual_seed(3))
    b = random_masks(2, 50, 0.5, torch.Generator().manual_seed(3))
    c = random_masks(2, 50, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a.ids_keep, b.ids_keep) and not torch.equal(a.ids_keep, c.ids_keep)


def test_distinct_keeps_the_highest_scores_in_patch_index_space():
    n = 196
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, n, generator=g)
    m = guided_masks(scores, 0.5, "distinct", g)
    _check_consistent(m, n, 98)
    for row in range(2):
        want = set(torch.topk(scores[row], 98).indices.tolist())      # independent top-k
        assert set(m.ids_keep[row].tolist()) == want
        kept, removed = scores[row][m.mask[row] == 0], scores[row][m.mask[row] == 1]
        assert kept.min() > removed.max()
        assert torch.all(scores[row][m.ids_keep[row]].diff() <= 0)   # descending keep order


def test_distinct_ties_prefer_the_lower_index():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5]])
    m = guided_masks(scores, 0.5, "distinct", torch.Generator())     # keep 2 of 5
    assert m.ids_keep.tolist() == [[1, 2]]


def test_official_compat_does_not_keep_the_top_patches():
    n, k = 208, 104
    scores = torch.zeros(4, n)
    scores[:, :k] = torch.linspace(2.0, 1.0, k)                       # true top-k = patches 0..103
    g = torch.Generator().manual_seed(0)
    fixed = guided_masks(scores, 0.5, "distinct", g)
    assert all(set(r.tolist()) == set(range(k)) for r in fixed.ids_keep)
    bug = guided_masks(official_compat_ranks(scores, g), 0.5, "distinct", g)
    overlap = torch.tensor([len(set(r.tolist()) & set(range(k))) / k for r in bug.ids_keep])
    assert overlap.mean() < 0.7                                       # chance level is 0.5


def test_gumbel_follows_sharp_scores_and_random_ignores_them():
    n = 100
    scores = torch.full((2, n), -1e4)
    scores[:, 10:60] = 0.0                                            # 50 allowed patches, keep 50
    g = torch.Generator().manual_seed(0)
    m = guided_masks(scores, 0.5, "gumbel", g, gumbel_tau=1.0)
    assert all(set(r.tolist()) == set(range(10, 60)) for r in m.ids_keep)
    # Flat scores: Gumbel top-k is a random subset, different per row.
    flat = guided_masks(torch.zeros(2, n), 0.5, "gumbel", g)
    assert set(flat.ids_keep[0].tolist()) != set(flat.ids_keep[1].tolist())
    r = guided_masks(scores, 0.5, "random", g)
    _check_consistent(r, n, 50)
    assert set(r.ids_keep[0].tolist()) != set(range(10, 60))


def official_prob_ranks(s: torch.Tensor, u: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """TG-DP get_patch2cls_rank(mode='prob') written out with the uniforms ``u`` given: probs = softmax
    of the raw scores / max(tau, 1e-12); g = -log(-log(clamp(u, 1e-12, 1 - 1e-12)));
    ranks = argsort(log(clamp(probs, min=1e-12)) + g, descending)."""
    eps = 1e-12
    probs = torch.exp(s / max(tau, eps)) / torch.exp(s / max(tau, eps)).sum(1, keepdim=True)
    g = -torch.log(-torch.log(u.clamp(eps, 1 - eps)))
    return torch.argsort(torch.log(probs.clamp(min=eps)) + g, dim=1, descending=True)


@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_gumbel_is_the_official_prob_mode(tau):
    n, k = 208, 104
    g = torch.Generator().manual_seed(5)
    raw = torch.rand(3, n, generator=g) * 0.02                  # patch->CLS attention values, as the teacher's
    m = guided_masks(raw, 0.5, "gumbel", torch.Generator().manual_seed(11), gumbel_tau=tau)
    u = torch.rand(3, n, generator=torch.Generator().manual_seed(11))   # the same draws
    assert torch.equal(m.ids_keep, official_prob_ranks(raw, u, tau)[:, :k])
    _check_consistent(m, n, k)
    # the raw scale matters: renormalising the row (x ~50 here) sharpens the distribution
    renorm = guided_masks(raw / raw.sum(1, keepdim=True), 0.5, "gumbel", torch.Generator().manual_seed(11),
                          gumbel_tau=tau)
    assert not torch.equal(renorm.ids_keep, m.ids_keep)


def test_distinct_is_invariant_to_renormalisation():
    raw = torch.rand(4, 208, generator=torch.Generator().manual_seed(2)) * 0.01
    g = torch.Generator()
    assert torch.equal(guided_masks(raw, 0.5, "distinct", g).ids_keep,
                       guided_masks(raw / raw.sum(1, keepdim=True), 0.5, "distinct", g).ids_keep)


def test_bad_ratio_and_mode():
    with pytest.raises(ValueError, match="ratio"):
        num_keep(10, 1.0)
    with pytest.raises(ValueError, match="guide mode"):
        guided_masks(torch.zeros(1, 4), 0.5, "best", torch.Generator())
