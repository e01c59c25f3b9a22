"""NVIDIA DALI data path over the webdataset shards (same Batch as :mod:`tgdp.data.loader`).

DALI reads the tars (``fn.readers.webdataset``, sharded by rank with ``shard_id``/``num_shards``,
shuffled in a seeded buffer), picks the frame (seeded ``fn.random.uniform`` in train, the fixed
``data.eval_frame`` in eval, or a forced ``frame``), decodes only that JPEG (nvJPEG ``"mixed"`` on a
GPU, ``"cpu"`` with ``device_id=None``), resizes the short side (cubic) and centre-crops/normalises
in ``crop_mirror_normalize``, and decodes the FLAC. The log-Mel and the audio window are then
computed by the *same torch code* as the torch path (:func:`tgdp.data.fbank.fbank`,
:func:`tgdp.data.windows.audio_windows`) on the device the batch lands on, so both paths agree to
float rounding. ``mel="dali"`` swaps in the all-DALI log-Mel (:func:`dali_logmel`), which is *not*
Kaldi-exact (see its docstring).

Corrupt data: samples with a missing member are dropped by the reader (``missing_component_behavior
="skip"``, not counted individually); rows with a wrong sample rate or audio shorter than one fbank
frame are dropped after the pipeline and counted in ``skipped``; an undecodable JPEG/FLAC raises
inside DALI (the DALI path expects shards written by ``tgdp.prepare``; use the torch loader to
audit untrusted shards).

Nothing here is imported by ``import tgdp.data``; DALI is imported inside functions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from tgdp.data.fbank import LOG_FLOOR, fbank, frame_geometry, num_frames
from tgdp.data.loader import IMAGENET_MEAN, IMAGENET_STD, MODES, Batch, sample_generator
from tgdp.data.shards import read_manifest
from tgdp.data.windows import audio_windows

__all__ = ["dali_available", "DaliLoader", "build_pipeline", "dali_logmel", "dali_logmel_numpy"]


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (CPU operators work without a GPU)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_logmel(audio, sample_rate: int = 16000, num_mel_bins: int = 128, subtract_waveform_mean: bool = True):
    """All-DALI log-Mel of a DALI audio node ``[N]`` -> ``[F, num_mel_bins]`` (time-major).

    Settings closest to Kaldi that DALI offers: global pre-emphasis 0.97 (border "clamp"), symmetric
    Hann(400) as ``window_fn``, nfft 512, step 160, ``center_windows=False`` (snip_edges), power 2,
    HTK mel from 20 Hz to Nyquist without normalisation, ``ln`` with the ``FLT_EPSILON`` floor.
    What DALI cannot do is Kaldi's per-frame DC removal and per-frame pre-emphasis, so the result
    differs from the Kaldi reference (``tests/kaldi_reference.py``). Measured max |diff| in log units
    (DALI 2.4, 16-bit audio; mel bins 0-9 / bins >= 10 / median of bins >= 10):

    ============================  ==========  ==========  ========
    signal                        bins 0-9    bins >= 10  median
    ============================  ==========  ==========  ========
    440 Hz tone                   0.009       0.007       0.0000
    30 Hz + DC offset 0.25        1.03        1.04        0.0000
    1 kHz tone + noise            4.1         0.019       0.0015
    white noise                   6.7         0.014       0.0014
    espeak-ng speech              6.9         0.30        0.0011
    freedesktop bell / complete   2.5 / 2.9   0.03        0.0013
    freedesktop phone-incoming    7.9         0.28        0.0016
    ============================  ==========  ==========  ========

    So: the low bins (below ~300 Hz) are off by several log units wherever a frame's local mean is
    not zero; the rest agrees to ~0.3. Use it only where Kaldi parity does not matter.
    """
    from nvidia.dali import fn

    g = frame_geometry(sample_rate)
    x = audio
    if subtract_waveform_mean:
        x = x - fn.reductions.mean(x)
    x = fn.preemphasis_filter(x, preemph_coeff=0.97, border="clamp")
    hann = [0.5 - 0.5 * math.cos(2 * math.pi * j / (g.length - 1)) for j in range(g.length)]
    spec = fn.spectrogram(x, nfft=g.n_fft, window_length=g.length, window_step=g.shift, window_fn=hann,
                          center_windows=False, power=2, layout="ft")
    mel = fn.mel_filter_bank(spec, sample_rate=sample_rate, nfilter=num_mel_bins, freq_low=20.0,
                             freq_high=sample_rate / 2, mel_formula="htk", normalize=False)
    # multiplier ln(10) turns dB (10*log10) into ln; the cutoff floors the energy at FLT_EPSILON.
    db = fn.to_decibels(mel, multiplier=math.log(10.0), reference=1.0, cutoff_db=LOG_FLOOR)
    return fn.transpose(db, perm=[1, 0])


def dali_logmel_numpy(waves: list, sample_rate: int = 16000, num_mel_bins: int = 128) -> list:
    """Run :func:`dali_logmel` on CPU over 1-D float32 numpy waveforms; returns ``[F, M]`` arrays."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(waves), num_threads=1, device_id=None)
    def _pipe():
        a = fn.external_source(source=lambda: [np.asarray(w, dtype=np.float32) for w in waves],
                               dtype=types.FLOAT, batch=True)
        return dali_logmel(a, sample_rate, num_mel_bins)

    p = _pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(waves))]


def build_pipeline(paths: list[str], index_paths: list[str] | None, *, mode: str, frames_per_clip: int = 16,
                   img_size: int = 224, batch_size: int = 8, num_threads: int = 2, device_id: int | None = None,
                   rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 256,
                   frame: int | None = None, mel: str = "torch", sample_rate: int = 16000, shuffle: bool = False):
    """The DALI pipeline. Outputs: json (space-padded bytes), audio (zero-padded ``[N]``), alen ``[1]``,
    sr, frames (``[3, S, S]`` or ``frames_per_clip`` of them in retrieval), idx, and logmel if ``mel="dali"``.
    """
    from nvidia.dali import fn, pipeline_def, types

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
    k = frames_per_clip
    train = mode == "train"
    if frame is None and mode == "eval":
        raise ValueError("mode='eval' needs the fixed frame (data.eval_frame) as frame=")
    if frame is not None and not 0 <= frame < k:
        raise ValueError(f"frame={frame} must be in [0, {k})")
    gpu = device_id is not None

    def image(enc):
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(img, resize_shorter=img_size, interp_type=types.INTERP_CUBIC)
        return fn.crop_mirror_normalize(img, crop=(img_size, img_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                                        dtype=types.FLOAT, output_layout="CHW")

    @pipeline_def(enable_conditionals=True)
    def _pipe():
        outs = fn.readers.webdataset(paths=paths, index_paths=index_paths,
                                     ext=["json", "flac"] + [f"f{i:02d}.jpg" for i in range(k)],
                                     missing_component_behavior="skip", shard_id=rank, num_shards=world_size,
                                     random_shuffle=shuffle, initial_fill=max(1, shuffle_buffer), seed=seed,
                                     name="Reader")
        meta, flac, jpgs = outs[0], outs[1], list(outs[2:])
        if mode == "retrieval":
            idx = fn.constant(idata=0, shape=[], dtype=types.INT32)
            frames = [image(j) for j in jpgs]
        else:
            if frame is None and train:
                idx = fn.random.uniform(values=list(range(k)), dtype=types.INT32, seed=seed + 1)
            else:
                idx = fn.constant(idata=frame, shape=[], dtype=types.INT32)
            # No per-sample "select" operator: a chain of conditionals routes each sample's chosen
            # encoded frame, so only one JPEG per sample is decoded.
            enc = jpgs[0]
            for i in range(1, k):
                if idx == i:
                    enc = jpgs[i]
            frames = [image(enc)]
        audio, sr = fn.decoders.audio(flac, dtype=types.FLOAT, downmix=False)
        audio = audio[:, 0]
        alen = audio.shape()
        padded = fn.pad(audio, fill_value=0.0)
        extra = []
        if mel == "dali":
            extra = [fn.pad(dali_logmel(audio, sample_rate), axes=(0,), fill_value=LOG_FLOOR)]
        if gpu:
            padded = padded.gpu()
            extra = [e.gpu() for e in extra]
        return (fn.pad(meta, fill_value=32), padded, alen, sr, idx, *frames, *extra)

    return _pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=2)


class DaliLoader:
    """Iterable of :class:`Batch` from a DALI pipeline; same contract as :class:`tgdp.data.loader.TorchLoader`.

    ``device_id`` defaults to the CUDA device of ``device`` (or the current one) when CUDA is
    available, else ``None`` (CPU operators). Frame choice: seeded DALI RNG (train), ``data.eval_frame``
    (eval) or ``frame`` when given. Time shifts use :func:`tgdp.data.loader.sample_generator` like the
    torch path.
    """

    backend = "dali"

    def __init__(self, root, mode: str = "train", *, data=None, img_size: int = 224, audio_length: int = 416,
                 batch_size: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 2,
                 device=None, device_id: int | None | str = "auto", frame: int | None = None, mel: str = "torch",
                 shuffle: bool | None = None, drop_last: bool | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
        if mel not in ("torch", "dali"):
            raise ValueError(f"mel={mel!r} must be 'torch' or 'dali'")
        if data is None:
            from tgdp.configs import DataConfig
            data = DataConfig()
        if frame is not None and not 0 <= frame < data.frames_per_clip:
            raise ValueError(f"frame={frame} must be in [0, {data.frames_per_clip})")
        if device_id == "auto":
            if torch.cuda.is_available():
                dev = torch.device(device) if device is not None else torch.device("cuda")
                device_id = dev.index if dev.index is not None else torch.cuda.current_device()
            else:
                device_id = None
        root = Path(root).expanduser()
        shards = read_manifest(root)["shards"]
        paths = [str(root / s["path"]) for s in shards]
        idx = [str(Path(p).with_suffix(".idx")) for p in paths]
        index_paths = idx if all(Path(p).is_file() for p in idx) else None
        self.mode, self.data, self.audio_length, self.seed, self.epoch = mode, data, audio_length, seed, 0
        self.mel, self.device = mel, device
        self.skipped: Counter = Counter()
        k = data.frames_per_clip
        frame = data.eval_frame if (mode == "eval" and frame is None) else frame
        self.pipe = build_pipeline(paths, index_paths, mode=mode, frames_per_clip=k, img_size=img_size,
                                   batch_size=batch_size, num_threads=num_threads, device_id=device_id, rank=rank,
                                   world_size=world_size, seed=seed, shuffle_buffer=data.shuffle_buffer,
                                   frame=frame, mel=mel, sample_rate=data.sample_rate,
                                   shuffle=(mode == "train") if shuffle is None else shuffle)
        drop_last = (mode == "train") if drop_last is None else drop_last
        nf = k if mode == "retrieval" else 1
        self._names = ["json", "audio", "alen", "sr", "idx"] + [f"f{i}" for i in range(nf)] + \
            (["logmel"] if mel == "dali" else [])
        self._it = DALIGenericIterator([self.pipe], self._names, reader_name="Reader", auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.DROP if drop_last
                                       else LastBatchPolicy.PARTIAL)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # seeds the per-sample time shift; DALI reshuffles by itself each epoch

    def __iter__(self) -> Iterator[Batch]:
        for out in self._it:
            b = self._to_batch(out[0])
            if len(b):
                yield b

    def _to_batch(self, o: dict) -> Batch:
        d, k = self.data, self.data.frames_per_clip
        # json, sr and lengths are CPU outputs of the pipeline: reading them costs no device sync.
        metas = [json.loads(bytes(row.tolist()).decode()) for row in o["json"]]
        sr = o["sr"].reshape(-1).round().long()
        lengths = o["alen"].reshape(-1).long()
        bad_sr = sr != d.sample_rate
        short = ~bad_sr & (lengths < frame_geometry(d.sample_rate).length)
        skipped = Counter({"wrong sample rate": int(bad_sr.sum()), "short audio": int(short.sum())})
        skipped = +skipped  # drop zero counts
        self.skipped.update(skipped)
        keep = (~bad_sr & ~short).nonzero().reshape(-1)
        metas = [metas[i] for i in keep.tolist()]
        per = k if self.mode == "retrieval" else 1
        if not metas:
            return Batch(torch.empty(0), torch.empty(0), [], [], torch.empty(0, dtype=torch.long), dict(skipped))
        dev = o["audio"].device
        audio, lengths = o["audio"][keep.to(dev)], lengths[keep]
        if self.mode == "retrieval":
            frames = torch.stack([o[f"f{i}"] for i in range(k)], dim=1)[keep.to(o["f0"].device)].flatten(0, 1)
            fidx = torch.arange(k).repeat(len(metas))
        else:
            frames = o["f0"][keep.to(o["f0"].device)]
            fidx = o["idx"].reshape(-1).long()[keep]
        if self.mel == "dali":
            fb = o["logmel"][keep.to(o["logmel"].device)].float()
        else:
            fb = fbank(audio[:, : int(lengths.max())], d.sample_rate, lengths=lengths.to(dev), check_finite=False)
        nf = num_frames(lengths, d.sample_rate)
        rows = [m for m in metas for _ in range(per)]
        times = torch.tensor([m["frame_times"][i] for m, i in zip(rows, fidx.tolist())], dtype=torch.float64)
        shifts = None
        if self.mode == "train" and d.time_shift > 0:
            m = int(d.time_shift * self.audio_length)
            shifts = torch.cat([torch.randint(-m, m + 1, (1,), generator=sample_generator(
                self.seed, self.epoch, str(meta["id"]), "shift")) for meta in metas])
        if per > 1:
            fb, nf = fb.repeat_interleave(per, 0), nf.repeat_interleave(per, 0)
        win = audio_windows(fb, fidx.to(fb.device), times.to(fb.device), num_frames=nf.to(fb.device), data=d,
                            length=self.audio_length, shifts=None if shifts is None else shifts.to(fb.device))
        b = Batch(win, frames, [[str(x) for x in m.get("labels", [])] for m in metas], [str(m["id"]) for m in metas],
                  fidx.to(frames.device), dict(skipped))
        return b.to(self.device, non_blocking=True) if self.device is not None else b
