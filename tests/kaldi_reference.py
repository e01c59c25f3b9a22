"""Independent Kaldi fbank reference for the tests (float64 numpy, one frame at a time).

Written from Kaldi's documented algorithm (feat/feature-window.cc ``ExtractWindow`` /
``ProcessWindow``, feat/mel-computations.cc ``MelBanks``, feat/feature-fbank.cc ``Compute``), not
from ``tgdp.data.fbank``: frames are cut with explicit index arithmetic, each frame is processed in a
Python loop, the mel filters are filled bin by bin with scalar maths, and everything is float64.
Only the options the official loader uses are implemented (spec §5.2).
"""

from __future__ import annotations

import math

import numpy as np

FLT_EPSILON = 1.1920928955078125e-07


def _mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


def mel_filters(num_bins: int, n_fft: int, sample_rate: float, low_freq: float = 20.0,
                high_freq: float = 0.0) -> list[tuple[int, np.ndarray]]:
    """Kaldi MelBanks: per bin, (first FFT index, weights) over FFT bins 0 .. n_fft/2 - 1."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0:
        high_freq = nyquist + high_freq
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    width = sample_rate / n_fft
    banks = []
    for b in range(num_bins):
        left, centre, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        first, weights = -1, []
        for i in range(n_fft // 2):
            m = _mel(width * i)
            if left < m < right:
                w = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
                if first < 0:
                    first = i
                weights.append(w)
            elif first >= 0:
                break
        banks.append((first, np.asarray(weights, dtype=np.float64)))
    return banks


def kaldi_fbank(wave: np.ndarray, sample_rate: int = 16000, num_bins: int = 128,
                subtract_waveform_mean: bool = True) -> np.ndarray:
    """``[F, num_bins]`` float64 log-Mel of a 1-D waveform (official loader + Kaldi fbank options)."""
    x = np.asarray(wave, dtype=np.float64).copy()
    if subtract_waveform_mean:
        x -= x.mean()
    frame_len = int(sample_rate * 0.025)
    shift = int(sample_rate * 0.010)
    n_fft = 1
    while n_fft < frame_len:
        n_fft *= 2
    n_frames = 1 + (len(x) - frame_len) // shift if len(x) >= frame_len else 0
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * j / (frame_len - 1)) for j in range(frame_len)])
    banks = mel_filters(num_bins, n_fft, sample_rate)
    out = np.empty((n_frames, num_bins), dtype=np.float64)
    for f in range(n_frames):
        frame = x[f * shift: f * shift + frame_len].copy()
        frame -= frame.mean()                       # remove_dc_offset
        for j in range(frame_len - 1, 0, -1):       # pre-emphasis, in place from the end as Kaldi does
            frame[j] -= 0.97 * frame[j - 1]
        frame[0] -= 0.97 * frame[0]
        frame *= hann
        padded = np.zeros(n_fft)
        padded[:frame_len] = frame
        spec = np.fft.rfft(padded)
        power = spec.real ** 2 + spec.imag ** 2
        for b, (first, w) in enumerate(banks):
            energy = float(np.dot(power[first:first + len(w)], w)) if first >= 0 else 0.0
            out[f, b] = math.log(max(energy, FLT_EPSILON))
    return out
