"""data.host_masks: reconstruction masks packed on the host by tgdp.pack during batch assembly.

Checks: the data path's masks are tgdp.pack's (called directly) and well-formed Masks; audio padding
patches are never visible (hand-computed valid columns, and end to end through the shard loader on a
short clip); the fixed-k fallback for too-short windows; DDP slicing by global index; exact resume;
C++ == numpy fallback; training steps equal a run fed the same masks explicitly.
"""

import numpy as np
import pytest
import torch

from _train_helpers import SMALL_DICT
from test_loader import write_dataset
from tgdp import pack
from tgdp.configs import apply_overrides, tiny
from tgdp.data.fbank import LOG_FLOOR
from tgdp.data.loader import ShardDataset, valid_time_columns
from tgdp.masking import num_keep
from tgdp.training.distributed import DistInfo
from tgdp.training.loop import train_step
from tgdp.training.trainer import Trainer
from tgdp.training.sources import CachedSource, HostMasks, LoaderSource, RandomSource, TrainBatch, host_rec_masks

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def cfg_of(tmp_path=None, **over):
    base = {**SMALL_DICT, "train.steps": 3, "data.host_masks": True}
    if tmp_path is not None:
        base["train.out_dir"] = str(tmp_path)
    return apply_overrides(tiny(), {**base, **over}).validate()


def check_masks_form(m, n: int, k: int, visible_ok) -> None:
    """Independent checks of one Masks: k distinct kept ids, mask = complement, ids_restore inverse."""
    b = m.ids_keep.shape[0]
    assert m.ids_keep.shape == (b, k) and m.ids_restore.shape == (b, n) and m.mask.shape == (b, n)
    assert m.mask.dtype == torch.float32 and m.ids_keep.dtype == torch.int64
    for r in range(b):
        keep = m.ids_keep[r].tolist()
        assert len(set(keep)) == k and all(visible_ok(r, p) for p in keep)
        want = torch.ones(n)
        want[keep] = 0.0
        assert torch.equal(m.mask[r], want)
        assert sorted(m.ids_restore[r].tolist()) == list(range(n))
        assert torch.equal(m.ids_restore[r][m.ids_keep[r]], torch.arange(k))  # kept first, in keep order


# ----------------------------------------------------------------------------- valid columns

def test_valid_time_columns_by_hand():
    # window of 64 rows, patches of 16: real rows = real - start (a prefix), floored to whole patches
    real = torch.tensor([148, 148, 148, 10, 1024])
    starts = torch.tensor([0, 109, 100, 0, 500])
    assert valid_time_columns(real, starts, 64, 16).tolist() == [4, 2, 3, 0, 4]   # 64, 39, 48, 10, 64 rows
    # circular shift: out row t = in row (t - s) mod 64. 39 real rows, s = -7 -> rows 0..31 real (2 cols);
    # s = +5 -> rows 0..4 come from the padded tail: no real prefix; s = +30 -> rows 30..68 wrap: 5 real rows
    real, starts = torch.tensor([148] * 3), torch.tensor([109] * 3)
    assert valid_time_columns(real, starts, 64, 16, torch.tensor([-7, 5, 30])).tolist() == [2, 0, 0]
    assert valid_time_columns(torch.tensor([148]), torch.tensor([109]), 64, 4, torch.tensor([30])).tolist() == [1]


# ----------------------------------------------------------------------------- masks = tgdp.pack

def test_data_path_masks_equal_pack_called_directly():
    cfg = cfg_of()
    m = cfg.model
    rows, cols = m.audio_grid
    ka, kv = num_keep(m.num_patches_a, cfg.masking.rec_ratio), num_keep(m.num_patches_v, cfg.masking.rec_ratio)
    src = RandomSource(cfg)
    for step in range(2):
        b = src.next()
        ma, mv = b.masks_rec
        for mk, n, k, kw in ((ma, m.num_patches_a, ka, dict(grid=(rows, cols), valid=[cols] * 4)),
                             (mv, m.num_patches_v, kv, dict(valid=[m.num_patches_v] * 4))):
            ref = pack.pack(kw.pop("valid"), num_patches=n, seed=cfg.train.seed, step=step, keep=k,
                            mask_dtype="float32", **kw).buffers
            assert torch.equal(mk.ids_keep, torch.from_numpy(ref.ids_keep))
            assert torch.equal(mk.ids_restore, torch.from_numpy(ref.ids_restore))
            assert torch.equal(mk.mask, torch.from_numpy(ref.mask))
            check_masks_form(mk, n, k, lambda r, p: True)
    assert not torch.equal(ma.ids_keep, RandomSource(cfg).next().masks_rec[0].ids_keep)  # step 1 != step 0
    # resume: a fresh source at position 1 draws step 1's masks again
    again = RandomSource(cfg)
    again.load_state_dict({"kind": "random", "step": 1})
    assert torch.equal(again.next().masks_rec[0].ids_keep, ma.ids_keep)


def test_padding_never_visible_and_short_window_fallback():
    cfg = cfg_of()
    m = cfg.model
    rows, cols = m.audio_grid                       # (8, 4); k = 8 -> 1 column holds k patches
    k = num_keep(m.num_patches_a, cfg.masking.rec_ratio)
    need = -(-k // rows)
    valid = [3, 1, 0, 4]
    hm = HostMasks(cfg, pinned=False)
    (ma, _), event = hm(7, torch.tensor(valid))
    assert event is None and hm.fallbacks == 1     # only the empty window cannot hold k patches
    eff = [max(v, need) for v in valid]
    check_masks_form(ma, m.num_patches_a, k, lambda r, p: p % cols < eff[r])
    for r, v in enumerate(valid[:2]):              # a real window: no padding column ever visible
        assert ma.mask.view(4, rows, cols)[r, :, v:].eq(1).all()
    with pytest.raises(ValueError, match="audio_valid"):
        hm(0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="audio_valid"):
        hm(0, torch.tensor([1, 2, 3, cols + 1]))


def test_short_clip_through_the_shard_loader(tmp_path):
    root = tmp_path / "shards"
    write_dataset(root, [4], seconds=1.5)           # 148 fbank rows, far fewer than the 1024 of a window set
    cfg = cfg_of(tmp_path, **{"data.root": str(root), "data.loader": "torch", "train.batch_size": 2})
    p = cfg.model.patch_size
    # frame 15 sits at 1.406 s: its 64-row window starts at row 109, so 39 rows are real -> 2 columns
    it = next(iter(ShardDataset(root, "train", data=cfg.data, img_size=cfg.model.img_size,
                                audio_length=cfg.model.audio_length, frame=15, patch_size=p)))
    assert it["audio_valid"].tolist() == [39 // p]
    # the DALI loader reports the same valid columns for every window (retrieval: all 16 frames)
    from tgdp.data.dali import DaliLoader
    from tgdp.data.loader import TorchLoader
    kw = dict(data=cfg.data, img_size=cfg.model.img_size, audio_length=cfg.model.audio_length, patch_size=p)
    t_valid = torch.cat([b.audio_valid for b in TorchLoader(ShardDataset(root, "retrieval", **kw), 2)])
    d_valid = torch.cat([b.audio_valid for b in DaliLoader(root, "retrieval", batch_size=2, **kw)])
    assert torch.equal(t_valid, d_valid) and len(set(t_valid.tolist())) > 1
    pad = (LOG_FLOOR - cfg.data.fbank_mean) / cfg.data.fbank_std
    is_pad = (it["audio"][0] - pad).abs().amax(dim=1) < 1e-6
    assert not is_pad[:39].any() and is_pad[39:].all()
    # end to end: random frames, every visible audio patch holds only real (non-padding) rows
    src = LoaderSource(cfg, root=str(root))
    rows, cols = cfg.model.audio_grid
    seen_short = False
    for step in range(2):
        b = src.next()
        ma = b.masks_rec[0]
        pad_rows = (b.audio - pad).abs().amax(dim=2) < 1e-6                    # [B, T]
        pad_cols = pad_rows.view(b.audio.shape[0], cols, p).any(dim=2)          # [B, cols]
        seen_short |= bool(pad_cols.any())
        vis = ma.mask.view(-1, rows, cols).eq(0).any(dim=1)                     # [B, cols]
        assert not (vis & pad_cols).any()
        assert ma.ids_keep.shape[1] == num_keep(cfg.model.num_patches_a, cfg.masking.rec_ratio)
    assert src.state_dict()["step"] == 2
    assert seen_short, "the test clips should produce windows that reach into the padding"
    # the in-memory cache keeps each cached window's valid columns: frames 0 and 8 (0.75 s, all real)
    cached = CachedSource(apply_overrides(cfg, {"data.cache_frames": 2}), root=str(root))
    assert cached.valid.shape == (4, 2) and cached.valid[:, 1].eq(cols).all()
    b = cached.next()
    check_masks_form(b.masks_rec[0], cfg.model.num_patches_a,
                     num_keep(cfg.model.num_patches_a, cfg.masking.rec_ratio), lambda r, q: True)


# ----------------------------------------------------------------------------- DDP, backends

def test_ddp_ranks_draw_the_single_process_masks():
    cfg = cfg_of(**{"train.batch_size": 4})
    valid = torch.tensor([4, 0, 2, 1])
    one = host_rec_masks(cfg, 11, valid)
    parts = [host_rec_masks(cfg, 11, valid[2 * r: 2 * r + 2], rank=r, world_size=2) for r in range(2)]
    for mod in range(2):
        for f in ("ids_keep", "ids_restore", "mask"):
            assert torch.equal(getattr(one[mod], f), torch.cat([getattr(pt[mod], f) for pt in parts]))
    full, halves = RandomSource(cfg), [RandomSource(cfg, r, 2) for r in range(2)]
    a, hs = full.next(), [h.next() for h in halves]
    assert torch.equal(a.masks_rec[0].ids_keep, torch.cat([h.masks_rec[0].ids_keep for h in hs]))


@pytest.mark.skipif(not pack.HAS_EXTENSION, reason="the C++ packer is not built")
def test_cpp_and_fallback_give_identical_batches():
    cfg = cfg_of(**{"train.batch_size": 4})
    valid = torch.tensor([4, 0, 2, 1])
    for rank in range(2):
        c = host_rec_masks(cfg, 5, valid[2 * rank: 2 * rank + 2], rank, 2, backend="cpp")
        n = host_rec_masks(cfg, 5, valid[2 * rank: 2 * rank + 2], rank, 2, backend="numpy")
        for mod in range(2):
            for f in ("ids_keep", "ids_restore", "mask"):
                assert torch.equal(getattr(c[mod], f), getattr(n[mod], f))
    cpp_batch = RandomSource(cfg).next()
    with pack.force_fallback():
        np_batch = RandomSource(cfg).next()
    for mod in range(2):
        assert torch.equal(cpp_batch.masks_rec[mod].ids_restore, np_batch.masks_rec[mod].ids_restore)


# ----------------------------------------------------------------------------- training

def test_training_steps_equal_explicitly_fed_masks(tmp_path):
    host = Trainer(cfg_of(tmp_path / "a"), CPU, progress=False)
    plain_cfg = cfg_of(tmp_path / "b", **{"data.host_masks": False})
    plain = Trainer(plain_cfg, CPU, progress=False)
    full = np.full(plain_cfg.train.batch_size, plain_cfg.model.audio_grid[1])
    for step in range(3):
        hb = host.source.next()
        pb = plain.source.next()
        assert pb.masks_rec is None and torch.equal(hb.audio, pb.audio)
        fed = TrainBatch(pb.audio, pb.frames, host_rec_masks(plain_cfg, step, full))
        train_step(host.state, hb, step)
        train_step(plain.state, fed, step)
        assert torch.equal(host.state.sums, plain.state.sums)
        hs, ps = host.method.student.state_dict(), plain.method.student.state_dict()
        assert all(torch.equal(hs[k], ps[k]) for k in hs)
    # and the host masks really differ from the device-drawn ones (else the test proves nothing)
    other = Trainer(cfg_of(tmp_path / "c", **{"data.host_masks": False}), CPU, progress=False)
    train_step(other.state, other.source.next(), 0)
    fresh = Trainer(cfg_of(tmp_path / "d"), CPU, progress=False)
    train_step(fresh.state, fresh.source.next(), 0)
    assert not torch.equal(other.state.sums, fresh.state.sums)
