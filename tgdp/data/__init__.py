"""Data: Kaldi fbank, per-frame audio windows, the torch loader and the DALI pipeline over webdataset shards.

``import tgdp.data`` needs only torch/numpy: PIL and soundfile are imported when a sample is decoded,
DALI only by :mod:`tgdp.data.dali` (reached through :func:`make_loader` when DALI is chosen).
"""

from tgdp.data.fbank import LOG_FLOOR, fbank, mel_banks, num_frames
from tgdp.data.loader import Batch, ShardDataset, TorchLoader, make_loader
from tgdp.data.shards import read_manifest
from tgdp.data.windows import audio_windows, cut_windows, normalize, pad_or_cut, time_shift, window_starts

__all__ = ["LOG_FLOOR", "fbank", "mel_banks", "num_frames", "Batch", "ShardDataset", "TorchLoader",
           "make_loader", "read_manifest", "audio_windows", "cut_windows", "normalize", "pad_or_cut",
           "time_shift", "window_starts"]
