"""tgdp.data.windows: spec §5.2 window table, padding, shift, normalisation, frame/audio alignment."""

import numpy as np
import pytest
import torch

from tgdp.configs import DataConfig
from tgdp.data.fbank import LOG_FLOOR, fbank, num_frames
from tgdp.data.windows import (audio_windows, cut_windows, normalize, pad_or_cut, sample_shifts, time_shift,
                               window_starts)

SR = 16000

# spec §5.2 step 5: frame -> window rows (start of the 416-row window of the 1024-row fbank)
OFFICIAL_STARTS = {0: 0, 1: 0, 2: 0, 3: 0, 4: 48, 5: 112, 6: 176, 7: 240, 8: 304, 9: 368, 10: 432, 11: 496,
                   12: 560, 13: 608, 14: 608, 15: 608}


def test_official_window_table():
    idx = torch.arange(16)
    starts = window_starts(idx, mode="official")
    assert starts.tolist() == [OFFICIAL_STARTS[i] for i in range(16)]


def test_frame_time_starts():
    times = torch.tensor([0.0, 1.0, 3.125, 3.135, 6.0, 6.254, 9.375], dtype=torch.float64)
    got = window_starts(torch.zeros(7, dtype=torch.long), times, mode="frame_time").tolist()
    # centre = round(t * 100) (312.5 -> 312: half to even, like Python's round), start = clamp(centre - 208, 0, 608)
    assert got == [0, 0, 312 - 208, 314 - 208, 600 - 208, 625 - 208, 608]


def test_window_start_errors():
    with pytest.raises(ValueError, match="frame_time"):
        window_starts(torch.zeros(2, dtype=torch.long), None, mode="frame_time")
    with pytest.raises(ValueError, match="mode"):
        window_starts(torch.zeros(2, dtype=torch.long), mode="centre")
    with pytest.raises(ValueError, match="longer"):
        window_starts(torch.zeros(2, dtype=torch.long), mode="official", total=100, length=416)


def test_pad_or_cut():
    fb = torch.randn(2, 5, 4)
    out = pad_or_cut(fb, 8, pad="floor")
    assert out.shape == (2, 8, 4) and torch.equal(out[:, :5], fb) and (out[:, 5:] == LOG_FLOOR).all()
    assert (pad_or_cut(fb, 8, pad="zero")[:, 5:] == 0).all()
    assert torch.equal(pad_or_cut(fb, 3), fb[:, :3])
    masked = pad_or_cut(fb, 8, num_frames=torch.tensor([5, 2]), pad="zero")
    assert torch.equal(masked[1, :2], fb[1, :2]) and (masked[1, 2:] == 0).all()
    assert pad_or_cut(fb[0], 8).shape == (8, 4)
    with pytest.raises(ValueError, match="pad"):
        pad_or_cut(fb, 8, pad="mean")
    with pytest.raises(ValueError, match="shape"):
        pad_or_cut(torch.zeros(5), 8)


def test_cut_windows_matches_slicing():
    fb = torch.randn(3, 50, 4)
    starts = torch.tensor([0, 7, 40])
    out = cut_windows(fb, starts, 10)
    for b in range(3):
        assert torch.equal(out[b], fb[b, starts[b]: starts[b] + 10])


def test_time_shift_matches_roll():
    x = torch.randn(3, 12, 2)
    shifts = torch.tensor([0, 5, -3])
    out = time_shift(x, shifts)
    for b in range(3):
        assert torch.equal(out[b], torch.roll(x[b], int(shifts[b]), 0))


def test_sample_shifts_range_and_reproducible():
    a = sample_shifts(2000, 0.1, 416, torch.Generator().manual_seed(3))
    b = sample_shifts(2000, 0.1, 416, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.min() == -41 and a.max() == 41  # floor(0.1 * 416) = 41, both ends reachable


def test_normalize():
    x = torch.tensor([-5.081, 0.0])
    assert torch.allclose(normalize(x), torch.tensor([0.0, 5.081 / 4.4849]))
    with pytest.raises(ValueError, match="std"):
        normalize(x, 0.0, 0.0)


def test_audio_windows_recipe_by_hand():
    fb = torch.randn(2, 998, 128)
    data = DataConfig(pad="zero", window="official")
    out = audio_windows(fb, torch.tensor([15, 4]), data=data, length=416, shifts=torch.tensor([3, 0]))
    full = torch.cat([fb, torch.zeros(2, 26, 128)], 1)  # official: pad 998 -> 1024 with 0.0
    want0 = torch.roll(full[0, 608:1024], 3, 0)
    want1 = full[1, 48:464]
    assert torch.allclose(out[0], (want0 + 5.081) / 4.4849, atol=1e-6)
    assert torch.allclose(out[1], (want1 + 5.081) / 4.4849, atol=1e-6)
    with pytest.raises(ValueError, match="frame_idx"):
        audio_windows(fb, torch.tensor([1]), data=data)


def _clicks(times, seconds=10.0):
    x = np.zeros(int(seconds * SR), np.float32)
    rng = np.random.default_rng(0)
    x += 1e-4 * rng.standard_normal(len(x)).astype(np.float32)  # faint floor noise, not digital silence
    for t in times:
        s = int(round(t * SR))
        x[s: s + 48] += 0.8 * rng.standard_normal(48).astype(np.float32)  # 3 ms burst
    return torch.from_numpy(x)


@pytest.mark.parametrize("i", [0, 3, 5, 8, 12, 15])
def test_click_lands_at_window_centre(i):
    t = i * 10.0 / 16  # frame i of a 10 s clip sits at i * 10 / 16 s (prepare)
    fb = fbank(_clicks([t]))
    nf = torch.tensor([fb.shape[0]])
    win = audio_windows(fb.unsqueeze(0), torch.tensor([i]), torch.tensor([t]), num_frames=nf,
                        data=DataConfig(), length=416)[0]
    peak = int(win.mean(dim=1).argmax())
    start = int(window_starts(torch.tensor([i]), torch.tensor([t]), mode="frame_time")[0])
    # The click's frames are rows k with 160k <= click sample < 160k + 400: centred at t*100 - 1.25.
    want = round(t * 100) - start - 1
    assert abs(peak - want) <= 2
    if 0 < start < 608:
        assert abs(peak - 208) <= 3  # unclamped windows: the click is at the centre


def test_official_window_drifts_from_click():
    # Frame 12 at 7.5 s: official centre 768 (7.68 s) is 18 rows late; frame_time puts it at 208.
    fb = fbank(_clicks([7.5])).unsqueeze(0)
    nf = torch.tensor([fb.shape[1]])
    off = audio_windows(fb, torch.tensor([12]), num_frames=nf, data=DataConfig(window="official"))[0]
    ft = audio_windows(fb, torch.tensor([12]), torch.tensor([7.5]), num_frames=nf, data=DataConfig())[0]
    assert abs(int(off.mean(1).argmax()) - (750 - 1 - 560)) <= 2
    assert abs(int(ft.mean(1).argmax()) - 208) <= 3


def test_silence_window_is_floor_and_padding_matches():
    fb = fbank(torch.zeros(5 * SR)).unsqueeze(0)  # 498 frames, the rest is padding
    win = audio_windows(fb, torch.tensor([15]), torch.tensor([4.6875]), num_frames=num_frames(torch.tensor([5 * SR])),
                        data=DataConfig())
    assert torch.isfinite(win).all()
    assert torch.allclose(win, torch.full_like(win, (LOG_FLOOR + 5.081) / 4.4849))
