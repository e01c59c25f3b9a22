"""Host batch packer (tgdp.pack): C++ vs numpy fallback bit-identity, a scalar re-implementation of
the documented algorithm, property tests over random lengths, and the error messages."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgdp import pack as P

needs_ext = pytest.mark.skipif(not P.HAS_EXTENSION, reason="tgdp._packer not built or TGDP_NO_EXT=1 "
                               "(python setup.py build_ext --inplace); fallback-only tests still run")
BACKENDS = ["numpy", pytest.param("cpp", marks=needs_ext)]
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


# ---------------- independent scalar reference: the module docstring, one sample at a time ----------------

def _mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def reference_pack(valid, n_p, seed, step=0, ratio=None, keep=None, grid=None, ef=0, eb=0):
    """Python-int twin: returns (ids_keep rows, ids_restore rows, mask rows, cu_seqlens, pos_ids)."""
    base = _mix(_mix(seed ^ 0x243F6A8885A308D3) ^ step)
    keeps, restores, masks, pos, cu = [], [], [], [], [0]
    for b, v in enumerate(valid):
        if grid is None:
            toks = list(range(n_p))
            is_valid = [t < v for t in toks]
        else:
            rows, cols = grid
            toks = list(range(rows * cols))
            is_valid = [t % cols < v for t in toks]
        perm = [t for t in toks if is_valid[t]] + [t for t in toks if not is_valid[t]]
        n = sum(is_valid)
        if keep is not None:
            k = min(keep, n)
        else:
            k = 0 if n == 0 else max(1, int(n * (1.0 - ratio)))
        state = _mix(base ^ b)
        for j in range(k):
            state = (state + GOLDEN) & M64
            r = j + (((_mix(state) >> 32) * (n - j)) >> 32)
            perm[j], perm[r] = perm[r], perm[j]
        restore = [0] * n_p
        for j, t in enumerate(perm):
            restore[t] = j
        keeps.append(perm[:k])
        restores.append(restore)
        masks.append([0 if restore[t] < k else 1 for t in range(n_p)])
        pos += [-1] * ef + perm[:k] + [-1] * eb
        cu.append(cu[-1] + ef + k + eb)
    return keeps, restores, masks, cu, pos


def _assert_same(a: P.PackResult, b: P.PackResult) -> None:
    for f in P._FIELDS:
        np.testing.assert_array_equal(getattr(a.buffers, f), getattr(b.buffers, f), err_msg=f)
    assert (a.total_tokens, a.max_seqlen) == (b.total_tokens, b.max_seqlen)


# ---------------- PRNG ----------------

def test_splitmix64_matches_published_vector():
    # splitmix64.c (Vigna) seeded with 1234567: the first five outputs are well-known test values.
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
            16408922859458223821]
    states = np.array([(1234567 + (i + 1) * GOLDEN) & M64 for i in range(5)], np.uint64)
    assert P._mix64(states).tolist() == want
    assert [_mix(int(s)) for s in states] == want
    if P.HAS_EXTENSION:
        assert [P._ext.mix64(int(s)) for s in states] == want


@needs_ext
@pytest.mark.parametrize("seed,step,sample", [(0, 0, 0), (2**64 - 1, 7, 3), (12345, 2**40, 255)])
def test_stream_cpp_equals_numpy(seed, step, sample):
    np.testing.assert_array_equal(P._ext.splitmix64_stream(seed, step, sample, 50),
                                  P.splitmix64_stream(seed, step, sample, 50))


# ---------------- C++ == fallback == scalar reference ----------------

CASES = [  # valid, num_patches, grid, kwargs
    ([208, 100, 5, 0, 1, 208], 208, None, dict(ratio=0.75, extra_front=1, extra_back=8)),
    ([196, 2, 195, 50], 196, None, dict(ratio=0.5)),
    ([26, 3, 0, 13, 25], 208, (8, 26), dict(ratio=0.75, extra_front=1, extra_back=8)),
    ([26, 1, 7], 208, (8, 26), dict(keep=52)),
    ([7, 3, 1], 7, None, dict(ratio=0.0, extra_back=2)),
    ([1, 1], 1, None, dict(ratio=0.9)),
    ([13, 5], 13, None, dict(keep=0, extra_front=1)),
]


@pytest.mark.parametrize("valid,n_p,grid,kw", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_scalar_reference(valid, n_p, grid, kw, backend):
    for seed, step in [(0, 0), (123456789, 3), (2**64 - 1, 2**63)]:
        res = P.pack(np.array(valid), num_patches=n_p, grid=grid, seed=seed, step=step,
                     backend=backend, **kw)
        keeps, restores, masks, cu, pos = reference_pack(
            valid, n_p, seed, step, kw.get("ratio"), kw.get("keep"), grid,
            kw.get("extra_front", 0), kw.get("extra_back", 0))
        buf = res.buffers
        for b, kept in enumerate(keeps):
            assert buf.ids_keep[b, :len(kept)].tolist() == kept
            assert (buf.ids_keep[b, len(kept):] == -1).all()
        assert buf.ids_restore.tolist() == restores
        assert buf.mask.tolist() == masks
        assert buf.cu_seqlens.tolist() == cu
        assert buf.pos_ids[:len(pos)].tolist() == pos and (buf.pos_ids[len(pos):] == -1).all()
        assert res.total_tokens == cu[-1]


@needs_ext
@pytest.mark.parametrize("mask_dtype", ["uint8", "bool", "float32"])
def test_cpp_equals_fallback_many_seeds(mask_dtype):
    rng = np.random.default_rng(0)
    for trial in range(60):
        b = int(rng.integers(1, 40))
        grid = (int(rng.integers(1, 9)), int(rng.integers(1, 30))) if trial % 2 else None
        n_p = grid[0] * grid[1] if grid else int(rng.integers(1, 300))
        valid = rng.integers(0, (grid[1] if grid else n_p) + 1, size=b)
        kw = dict(ratio=float(rng.choice([0.0, 0.25, 0.5, 0.75, 0.9, rng.random()])))
        if trial % 5 == 0:
            kw = dict(keep=int(rng.integers(0, n_p + 1)))
        seed = int(rng.integers(0, 2**63)) * 2 + trial % 2  # reaches the top bit of uint64
        common = dict(num_patches=n_p, grid=grid, seed=seed, step=trial, mask_dtype=mask_dtype,
                      extra_front=trial % 2, extra_back=trial % 3, **kw)
        _assert_same(P.pack(valid, backend="cpp", **common), P.pack(valid, backend="numpy", **common))


# ---------------- properties over random lengths ----------------

@st.composite
def batches(draw):
    grid = draw(st.one_of(st.none(), st.tuples(st.integers(1, 8), st.integers(1, 26))))
    n_p = grid[0] * grid[1] if grid else draw(st.integers(1, 220))
    limit = grid[1] if grid else n_p
    valid = draw(st.lists(st.integers(0, limit), min_size=1, max_size=12))
    ratio = draw(st.sampled_from([0.0, 0.5, 0.75, 0.999]) | st.floats(0.0, 0.99))
    return np.array(valid), n_p, grid, ratio, draw(st.integers(0, 2)), draw(st.integers(0, 9))


@settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ in the repo
@given(case=batches(), seed=st.integers(0, 2**64 - 1), step=st.integers(0, 2**64 - 1))
def test_properties(case, seed, step):
    valid, n_p, grid, ratio, ef, eb = case
    res = P.pack(valid, num_patches=n_p, grid=grid, ratio=ratio, seed=seed, step=step,
                 extra_front=ef, extra_back=eb)
    buf = res.buffers
    tok = np.arange(n_p)
    cu = buf.cu_seqlens.astype(np.int64)
    assert cu[0] == 0 and res.total_tokens == cu[-1]
    for b, v in enumerate(valid):
        is_valid = (tok % grid[1] < v) if grid else (tok < v)
        n = int(is_valid.sum())
        k = 0 if n == 0 else max(1, int(n * (1 - ratio)))
        mask = buf.mask[b]
        assert (mask[~is_valid] == 1).all(), "padding must never be visible"
        assert int((mask[is_valid] == 0).sum()) == k
        kept = buf.ids_keep[b, :k]
        assert len(set(kept.tolist())) == k and is_valid[kept].all() and (mask[kept] == 0).all()
        assert (buf.ids_keep[b, k:] == -1).all()
        # ids_restore is the inverse of ids_shuffle = (kept, removed valid, padding ascending)
        shuffle = np.argsort(buf.ids_restore[b])
        np.testing.assert_array_equal(np.sort(buf.ids_restore[b]), tok)
        np.testing.assert_array_equal(shuffle[:k], kept)
        assert is_valid[shuffle[k:n]].all()
        np.testing.assert_array_equal(shuffle[n:], tok[~is_valid])
        # packed segment b = [extra_front x -1, kept patches, extra_back x -1]
        assert cu[b + 1] - cu[b] == ef + k + eb
        seg = buf.pos_ids[cu[b]:cu[b + 1]]
        np.testing.assert_array_equal(seg, np.r_[[-1] * ef, kept, [-1] * eb])
        assert (buf.seq_ids[cu[b]:cu[b + 1]] == b).all()
    assert (buf.pos_ids[res.total_tokens:] == -1).all() and (buf.seq_ids[res.total_tokens:] == -1).all()
    assert res.max_seqlen == int(np.diff(cu).max())
    np.testing.assert_array_equal(res.num_keep, np.diff(cu) - ef - eb)
    again = P.pack(valid, num_patches=n_p, grid=grid, ratio=ratio, seed=seed, step=step,
                   extra_front=ef, extra_back=eb)
    _assert_same(res, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_step_change_the_masks(backend):
    valid = np.full(8, 208)
    base = P.pack(valid, num_patches=208, ratio=0.75, seed=1, step=0, backend=backend).buffers.ids_keep
    for kw in (dict(seed=2, step=0), dict(seed=1, step=1)):
        other = P.pack(valid, num_patches=208, ratio=0.75, backend=backend, **kw).buffers.ids_keep
        assert all(set(base[b]) != set(other[b]) for b in range(8))
    assert len({frozenset(row) for row in base.tolist()}) == 8  # samples use different streams


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_subset_is_uniform(backend):
    # 4000 samples keep 3 of 10 tokens: every token kept ~1200 times (sd ~29), first draw uniform.
    res = P.pack(np.full(4000, 10), num_patches=10, keep=3, seed=5, backend=backend)
    counts = np.bincount(res.buffers.ids_keep.ravel(), minlength=10)
    assert np.abs(counts - 1200).max() < 5 * 29, counts
    first = np.bincount(res.buffers.ids_keep[:, 0], minlength=10)
    assert np.abs(first - 400).max() < 5 * 19, first


def test_full_clip_keep_count_matches_masking():
    masking = pytest.importorskip("tgdp.masking")
    for n_p, ratio in [(208, 0.75), (196, 0.75), (208, 0.5), (196, 0.5), (3, 0.9)]:
        res = P.pack([n_p, n_p], num_patches=n_p, ratio=ratio, seed=0)
        assert res.num_keep.tolist() == [masking.num_keep(n_p, ratio)] * 2


def test_config_geometry_matches_spec_sequence_lengths():
    # spec §1.4 table: 75 % masking keeps 52 audio / 49 video patches -> 1+52+8 = 61 and 1+49+8 = 58.
    from tgdp.configs import paper
    cfg = paper()
    a, v = P.config_kwargs(cfg, "audio"), P.config_kwargs(cfg, "video")
    assert a["grid"] == (8, 26) and a["num_patches"] == 208 and v["num_patches"] == 196
    cap = {k: P.capacities(4, kw["num_patches"], kw["ratio"], None, kw["extra_front"], kw["extra_back"])
           for k, kw in (("a", a), ("v", v))}
    assert cap == {"a": (52, 4 * 61), "v": (49, 4 * 58)}
    res = P.pack([26, 13, 26, 1], seed=0, **a)  # half a clip: 8 rows x 13 cols valid -> keep 26
    assert res.num_keep.tolist() == [52, 26, 52, 2] and res.max_seqlen == 61
    with pytest.raises(ValueError, match="modality='text'"):
        P.config_kwargs(cfg, "text")


# ---------------- buffers ----------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_element_is_rewritten(backend):
    valid = np.array([208, 50, 0])
    kw = dict(num_patches=208, ratio=0.75, seed=9, extra_front=1, extra_back=8, backend=backend)
    kcap, tcap = P.capacities(3, 208, ratio=0.75, extra_front=1, extra_back=8)
    assert (kcap, tcap) == (52, 3 * 61)
    dirty = P.PackBuffers.allocate(3, 208, kcap + 5, tcap + 7)
    for f in P._FIELDS:
        getattr(dirty, f)[...] = 7
    res = P.pack(valid, out=dirty, **kw)
    assert res.buffers is dirty
    clean = P.pack(valid, out=P.PackBuffers.allocate(3, 208, kcap + 5, tcap + 7), **kw)
    _assert_same(res, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_cpu_buffers_are_filled_in_place(backend):
    torch = pytest.importorskip("torch")
    out = P.PackBuffers(torch.empty(4, 20, dtype=torch.long), torch.empty(4, 40, dtype=torch.long),
                        torch.empty(4, 40, dtype=torch.float32), torch.empty(5, dtype=torch.int32),
                        torch.empty(100, dtype=torch.long), torch.empty(100, dtype=torch.int32))
    ptrs = [getattr(out, f).data_ptr() for f in P._FIELDS]
    valid = torch.tensor([40, 10, 3, 39])
    res = P.pack(valid, num_patches=40, ratio=0.5, seed=4, out=out, mask_dtype="float32", backend=backend)
    ref = P.pack(valid.numpy(), num_patches=40, ratio=0.5, seed=4, backend="numpy",
                 out=P.PackBuffers.allocate(4, 40, 20, 100, mask_dtype="float32"))
    assert [getattr(out, f).data_ptr() for f in P._FIELDS] == ptrs
    for f in P._FIELDS:
        np.testing.assert_array_equal(getattr(out, f).numpy(), getattr(ref.buffers, f), err_msg=f)
    assert res.total_tokens == ref.total_tokens
    with pytest.raises(ValueError, match="pos_ids must be a CPU tensor.*meta"):
        P.pack(valid, num_patches=40, ratio=0.5, seed=4, backend=backend,
               out=P.PackBuffers(*[getattr(out, f) if f != "pos_ids" else torch.empty(100, device="meta")
                                   for f in P._FIELDS]))


@needs_ext
def test_cpp_threads_agree():
    # The hot loop runs without the GIL: concurrent calls on separate buffers stay correct.
    valid = np.random.default_rng(1).integers(0, 209, size=256)
    want = P.pack(valid, num_patches=208, ratio=0.75, seed=3, backend="numpy")
    got = [None] * 4

    def work(i):
        got[i] = P.pack(valid, num_patches=208, ratio=0.75, seed=3, backend="cpp")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        _assert_same(g, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_clips(backend):
    res = P.pack(np.zeros(0, np.int64), num_patches=10, ratio=0.5, seed=0, extra_front=1, backend=backend)
    assert res.total_tokens == 0 and res.buffers.cu_seqlens.tolist() == [0]
    res = P.pack([0, 0], num_patches=10, ratio=0.5, seed=0, extra_front=1, extra_back=2, backend=backend)
    assert res.buffers.cu_seqlens.tolist() == [0, 3, 6] and (res.buffers.mask == 1).all()
    assert res.buffers.pos_ids.shape == (16,)  # capacity for full clips: 2 x (1 + 5 + 2)
    assert res.buffers.pos_ids.tolist() == [-1] * 16
    assert res.buffers.seq_ids.tolist() == [0] * 3 + [1] * 3 + [-1] * 10


@needs_ext
def test_extension_version_matches():
    assert P._ext.VERSION == P._EXT_VERSION


def test_backend_switches(monkeypatch):
    calls = []
    real = P._pack_numpy
    monkeypatch.setattr(P, "_pack_numpy", lambda *a: calls.append(1) or real(*a))
    with P.force_fallback():
        P.pack([5], num_patches=5, ratio=0.5, seed=0)
    assert calls == [1]
    monkeypatch.setattr(P, "_ext", None)
    with pytest.raises(RuntimeError, match="not built"):
        P.pack([5], num_patches=5, ratio=0.5, seed=0, backend="cpp")
    with pytest.raises(ValueError, match="backend='gpu'"):
        P.pack([5], num_patches=5, ratio=0.5, seed=0, backend="gpu")


# ---------------- bad input: ValueError with the values, identical from both backends ----------------

def _bufs(b=3, n_p=208, kcap=52, tcap=200, **replace):
    out = P.PackBuffers.allocate(b, n_p, kcap, tcap)
    return P.PackBuffers(**{f: replace.get(f, getattr(out, f)) for f in P._FIELDS})


ERRORS = [  # pack kwargs on top of valid=[208, 300, 10] etc., expected message (regex)
    (dict(valid=[208, -1, 3]), r"valid\[1\]=-1 is negative"),
    (dict(valid=[208, 10, 300]), r"valid\[2\]=300 exceeds num_patches=208"),
    (dict(valid=[26, 30, 3], grid=(8, 26)), r"valid\[1\]=30 exceeds cols=26 of grid=\(8, 26\)"),
    (dict(grid=(14, 14)), r"grid=\(14, 14\) has 196 tokens but num_patches=208"),
    (dict(ratio=1.0), r"ratio=1.0 must be in \[0, 1\)"),
    (dict(ratio=-0.25), r"ratio=-0.25 must be in \[0, 1\)"),
    (dict(ratio=float("nan")), r"ratio=nan must be in \[0, 1\)"),
    (dict(ratio=None, keep=209), r"keep=209 exceeds num_patches=208"),
    (dict(num_patches=0), r"num_patches=0 must be >= 1"),
    (dict(extra_back=-2), r"extra_front=0, extra_back=-2 must be >= 0"),
    (dict(valid=[[208]]), r"valid must be 1-D \[B\], got shape \(1, 1\)"),
    (dict(out=_bufs(kcap=40)), r"ids_keep holds 40 tokens per row but a sample keeps 52"),
    (dict(valid=[208, 208, 3], out=_bufs(tcap=100)), r"pos_ids holds 100 tokens but the batch packs 105"),
    (dict(out=_bufs(b=4)), r"ids_keep has shape \(4, 52\) but must be \[B, capacity\]; the batch has B=3"),
    (dict(out=_bufs(ids_restore=np.empty((3, 196), np.int64))),
     r"ids_restore has shape \(3, 196\) but must be \[B, N\]; the batch has B=3 samples of num_patches=208"),
    (dict(out=_bufs(mask=np.empty((3, 208), np.float64))), r"mask must be uint8, bool or float32, got float64"),
    (dict(out=_bufs(cu_seqlens=np.empty(4, np.int64))), r"cu_seqlens must be int32, got int64"),
    (dict(out=_bufs(cu_seqlens=np.empty(3, np.int32))), r"cu_seqlens has shape \(3,\) but must be \[B \+ 1\]"),
    (dict(out=_bufs(ids_keep=np.empty((52, 3), np.int64).T)), r"ids_keep must be C-contiguous"),
    (dict(out=_bufs(seq_ids=np.empty(199, np.int32))), r"seq_ids has shape \(199,\) but must match pos_ids \[200\]"),
]


@pytest.mark.parametrize("kw,msg", ERRORS, ids=[m[:28] for _, m in ERRORS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_with_values(kw, msg, backend):
    args = dict(valid=[208, 10, 3], num_patches=208, ratio=0.75, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        P.pack(args.pop("valid"), backend=backend, **args)


@needs_ext
@pytest.mark.parametrize("kw,msg", ERRORS, ids=[m[:28] for _, m in ERRORS])
def test_cpp_and_fallback_messages_are_identical(kw, msg):
    args = dict(valid=[208, 10, 3], num_patches=208, ratio=0.75, seed=0)
    args.update(kw)
    valid = args.pop("valid")
    texts = []
    for backend in ("cpp", "numpy"):
        with pytest.raises(ValueError) as err:
            P.pack(valid, backend=backend, **args)
        texts.append(str(err.value))
    assert texts[0] == texts[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_is_written_before_an_error(backend):
    out = _bufs(tcap=100)
    for f in P._FIELDS:
        getattr(out, f)[...] = 7
    read_only = _bufs()
    read_only.mask.flags.writeable = False
    with pytest.raises(ValueError, match="pos_ids holds 100"):
        P.pack([208, 208, 3], num_patches=208, ratio=0.75, seed=0, out=out, backend=backend)
    with pytest.raises(ValueError, match="mask is read-only"):
        P.pack([208, 10, 3], num_patches=208, ratio=0.75, seed=0, out=read_only, backend=backend)
    assert all((getattr(out, f) == 7).all() for f in P._FIELDS)


@pytest.mark.parametrize("kw,msg", [
    (dict(ratio=None), r"exactly one of ratio=None and keep=None"),
    (dict(keep=3), r"exactly one of ratio=0.75 and keep=3"),
    (dict(ratio=None, keep=-3), r"keep=-3 must be >= 0"),
    (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*64\)"),
    (dict(step=2**64), r"step=18446744073709551616 must be"),
    (dict(valid=[2.5, 3.0]), r"valid must hold integers, got float64"),
    (dict(out=P.PackBuffers(*([[0]] * 6))), r"ids_keep must be a numpy array or a CPU torch tensor, got list"),
])
def test_bad_scalars_in_the_wrapper(kw, msg):
    args = dict(valid=[208, 10, 3], num_patches=208, ratio=0.75, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        P.pack(args.pop("valid"), **args)
