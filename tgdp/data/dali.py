"""NVIDIA DALI data path over the webdataset shards (same Batch as :mod:`tgdp.data.loader`).

Each pass (epoch) is planned in Python by :mod:`tgdp.data.dali_plan` from the shards' ``.idx`` files
(or a header scan of the tar): the shard order and a full permutation of each shard's samples are
drawn from ``(seed, epoch)`` (train), the sequence is cut into ``world_size`` contiguous parts (one
per rank), and each train sample's frame is drawn like the torch path's
(:func:`tgdp.data.loader.sample_generator` on its key). The plan is written as per-run index files
where the chosen frame is the member ``img``, so DALI's ``fn.readers.webdataset`` reads
sequentially (no DALI shuffle, no DALI RNG) and reads and decodes only that JPEG (nvJPEG ``"mixed"`` on a GPU, ``"cpu"`` with ``device_id=None``); it then
resizes the short side (cubic), centre-crops/normalises (``crop_mirror_normalize``) and decodes the
FLAC. The log-Mel and audio window are computed by the *same torch code* as the torch path
(:func:`tgdp.data.fbank.fbank`, :func:`tgdp.data.windows.audio_windows`) on the device the batch
lands on, so both paths agree to float rounding. ``mel="dali"`` swaps in the all-DALI log-Mel
(:func:`dali_logmel`), which is *not* Kaldi-exact (see its docstring).

So an epoch is a function of (seed, epoch): ``set_epoch(e)`` on a fresh loader replays epoch e.
Mixing: a batch holds consecutive samples of the permuted sequence, i.e. mostly one shard (256
clips from ``tgdp.prepare``, which cuts shards in sha1-of-id order, so classes are mixed even for a
class-sorted input list); ``data.shuffle_buffer`` is not used here.

Corrupt data is skipped and counted (``skipped``), never replaced, each sample once per epoch:

- a missing or empty member ("missing member"), or one past the end of a truncated tar ("bad
  shard", per sample): seen in the index, never handed to DALI (no cost);
- wrong sample rate, audio shorter than one fbank frame, unreadable JSON, a member whose sha256
  differs from its metadata's ("checksum": the raw FLAC and JPEG bytes the reader already read are
  pipeline outputs too, hashed on the host): dropped after the pipeline;
- an undecodable JPEG/FLAC: DALI raises and its pipeline is dead. The loader probes the samples that
  can be in flight (at most ``(PREFETCH + 1) * batch_size``, from the first one not yet delivered)
  with a synchronous batch-1 pipeline, records the first failing one in ``bad`` ("bad image" /
  "bad audio"), and rebuilds the pipeline from the first undelivered sample without it. Cost per
  corrupt sample: two pipeline builds plus decoding up to ``3 * batch_size`` samples once; later
  epochs leave it out of the plan. Removing a sample does not move the others, so a run that meets
  a corrupt sample mid-epoch delivers exactly the batches of a run that knew it from the start.

Nothing here is imported by ``import tgdp.data``; DALI is imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from tgdp.data.dali_plan import load_catalog, plan_epoch, planned_frame, scan_shard, write_indexes
from tgdp.data.batch import IMAGENET_MEAN, IMAGENET_STD, MODES, Batch, sample_generator, valid_time_columns
from tgdp.data.fbank import LOG_FLOOR, fbank, frame_geometry, num_frames, to_device
from tgdp.data.shards import check_members, read_manifest, shard_notes
from tgdp.data.windows import audio_windows, window_starts

__all__ = ["dali_available", "default_threads", "DaliLoader", "build_pipeline", "scan_shard", "dali_logmel",
           "dali_logmel_numpy"]

PREFETCH = 2  # DALI prefetch_queue_depth: batches that can be in flight past the last one delivered


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

def build_pipeline(paths: list[str], index_paths: list[str], *, retrieval: bool, frames_per_clip: int = 16,
                   img_size: int = 224, batch_size: int = 8, num_threads: int = 2, device_id: int | None = None,
                   seed: int = 0, mel: str = "torch", sample_rate: int = 16000, probe: bool = False):
    """The DALI pipeline over per-run index files written by :class:`DaliLoader` (see the module doc).

    The reader is sequential (no DALI shuffle, no DALI RNG): order and frame choice live in the index.
    Outputs: json (space-padded bytes), audio (zero-padded ``[N]``), alen ``[1]``, sr, then the frame
    ``[3, S, S]`` (member ``img``) or all ``frames_per_clip`` frames (retrieval), then the raw
    (encoded) FLAC and frame bytes, zero-padded, each followed by its length (host outputs, for the
    checksums), and logmel ``[F, 128]`` if ``mel="dali"``. ``probe=True``: synchronous executor, so the error of iteration i
    belongs to sample i (batch_size 1).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    exts = ["json", "flac"] + ([f"f{i:02d}.jpg" for i in range(frames_per_clip)] if retrieval else ["img"])

    def image(enc):
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(img, resize_shorter=img_size, interp_type=types.INTERP_CUBIC)
        return fn.crop_mirror_normalize(img, crop=(img_size, img_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                                        dtype=types.FLOAT, output_layout="CHW")

    @pipeline_def
    def _pipe():
        # "error": the loader never lists a sample with a missing member, so one here is a bug.
        outs = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=exts, random_shuffle=False,
                                     missing_component_behavior="error", name="Reader")
        meta, flac, jpgs = outs[0], outs[1], list(outs[2:])
        frames = [image(j) for j in jpgs]
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
        raw = [x for enc in (flac, *jpgs) for x in (fn.pad(enc, fill_value=0), enc.shape())]
        return (fn.pad(meta, fill_value=32), padded, alen, sr, *frames, *raw, *extra)

    sync = dict(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1) if probe else \
        dict(prefetch_queue_depth=PREFETCH)
    return _pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, **sync)


def _reason(message: str) -> str:
    """Skip-counter key for a DALI error message (same keys as the torch loader where they exist)."""
    for op, reason in (("decoders.image", "bad image"), ("decoders.audio", "bad audio"),
                       ("readers.webdataset", "bad shard")):
        if op in message:
            return reason
    return "bad sample"


def default_threads() -> int:
    """CPU threads of one rank's DALI pipeline: DALI decodes FLAC on the CPU only (and does the host
    part of nvJPEG there), so it gets the CPUs this process may run on, shared among the ranks of the
    node (``LOCAL_WORLD_SIZE``, set by torchrun), and at least 2."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        cores = os.cpu_count() or 2
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, cores // local)


class DaliLoader:
    """Iterable of :class:`Batch` from a DALI pipeline; same contract as :class:`tgdp.data.loader.TorchLoader`.

    ``device_id`` defaults to the CUDA device of ``device`` (or the current one) when CUDA is
    available, else ``None`` (CPU operators). ``num_threads`` defaults to :func:`default_threads`
    (``data.dali_threads`` overrides it). Order, rank split and frame choice are planned in
    Python per epoch (module doc); ``skipped`` counts corrupt samples, each once per epoch it is met.
    ``bad`` maps ``(shard path, key)`` -> reason for the undecodable samples found so far.
    """

    backend = "dali"

    def __init__(self, root, mode: str = "train", *, data=None, img_size: int = 224, audio_length: int = 416,
                 batch_size: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int | None = None,
                 device=None, device_id: int | None | str = "auto", frame: int | None = None, mel: str = "torch",
                 shuffle: bool | None = None, drop_last: bool | None = None, patch_size: int = 16):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
        if mel not in ("torch", "dali"):
            raise ValueError(f"mel={mel!r} must be 'torch' or 'dali'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_threads is None:
            num_threads = default_threads()
        for name, v in (("batch_size", batch_size), ("num_threads", num_threads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
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
        self.mode, self.data, self.audio_length, self.seed, self.epoch = mode, data, audio_length, seed, 0
        self.patch_size = patch_size  # audio patch rows, for the valid time columns of each window
        self.mel, self.device, self.rank, self.world_size = mel, device, rank, world_size
        self.frame = data.eval_frame if (mode == "eval" and frame is None) else frame
        self.shuffle = (mode == "train") if shuffle is None else shuffle
        self.drop_last = (mode == "train") if drop_last is None else drop_last
        self._opts = dict(retrieval=mode == "retrieval", frames_per_clip=data.frames_per_clip, img_size=img_size,
                          num_threads=num_threads, device_id=device_id, mel=mel, sample_rate=data.sample_rate)
        self.batch_size = batch_size
        self.skipped: Counter = Counter()
        self._bad: dict[tuple[int, int], str] = {}  # (shard, sample) -> reason
        # Catalog (tgdp.data.dali_plan.ShardEntry per manifest shard): keys, member offsets/sizes in
        # self._exts order, and the samples that never reach DALI (missing member, truncated tar).
        self._exts = ["json", "flac"] + [f"f{i:02d}.jpg" for i in range(data.frames_per_clip)]
        self._shards, self._bad_tars = load_catalog(root, self._exts)
        self.root, self.manifest = root, read_manifest(root)
        self.checksums, self.notes = shard_notes(root, self.manifest, data)
        self._tmp = tempfile.mkdtemp(prefix="tgdp-dali-")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._runs = 0
        nf = data.frames_per_clip if mode == "retrieval" else 1
        raw = ["flac"] + [f"f{i:02d}.jpg" for i in range(nf)] if mode == "retrieval" else ["flac", "img"]
        self._raw = raw
        self._names = ["json", "audio", "alen", "sr"] + [f"f{i}" for i in range(nf)] + \
            [n for r in raw for n in (f"raw:{r}", f"rawlen:{r}")] + (["logmel"] if mel == "dali" else [])

    @property
    def bad(self) -> dict[tuple[str, str], str]:
        """``(shard path, key) -> reason`` of the undecodable samples found so far."""
        return {(self._shards[s].path, self._shards[s].keys[i]): r for (s, i), r in self._bad.items()}

    def set_epoch(self, epoch: int) -> None:
        """Order, rank split and frames (and time shifts) of the next pass are drawn from (seed, epoch)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative int")
        self.epoch = epoch

    # ------------------------------------------------------------------ plan

    def _plan(self, epoch: int) -> tuple[list[tuple[int, int, int]], Counter]:
        """This rank's samples of one epoch, in order, as ``(shard, sample, frame)`` (frame -1: all),
        and the skip counts of the corrupt samples in its share (:func:`tgdp.data.dali_plan.plan_epoch`)."""
        return plan_epoch(self._shards, self._bad, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                          rank=self.rank, world_size=self.world_size, bad_tars=self._bad_tars,
                          frame_of=self._frame_of)

    def _frame_of(self, key: str, epoch: int) -> int:
        return planned_frame(key, epoch, mode=self.mode, frame=self.frame,
                             frames_per_clip=self.data.frames_per_clip, seed=self.seed)

    def _write_indexes(self, plan) -> tuple[list[str], list[str]]:
        """Index files for ``plan`` in a fresh folder of this loader's temp dir -> (paths, index_paths)."""
        for old in Path(self._tmp).iterdir():  # the pipelines reading them are gone
            shutil.rmtree(old, ignore_errors=True)
        self._runs += 1
        return write_indexes(Path(self._tmp) / f"run{self._runs}", self._shards, self._exts, plan)

    def _pipeline(self, plan, probe: bool = False):
        paths, idx = self._write_indexes(plan)
        seed = int.from_bytes(hashlib.blake2b(f"{self.seed}:{self.epoch}".encode(), digest_size=4).digest(), "little")
        pipe = build_pipeline(paths, idx, batch_size=1 if probe else self.batch_size, seed=seed, probe=probe,
                              **self._opts)
        pipe.build()
        return pipe

    def _find_bad(self, cands) -> tuple[int, str] | None:
        """Index into ``cands`` of the first sample DALI cannot process, and why (None: all fine)."""
        pipe = self._pipeline(cands, probe=True)
        for i in range(len(cands)):
            try:
                pipe.run()
            except RuntimeError as exc:
                return i, _reason(str(exc))
        return None

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        plan, carry = self._plan(self.epoch)
        self.skipped.update(carry)
        pos = 0  # first plan entry not yet delivered (or dropped after the pipeline)
        while pos < len(plan) and not (self.drop_last and len(plan) - pos < self.batch_size):
            it = None
            try:
                it = DALIGenericIterator([self._pipeline(plan[pos:])], self._names, reader_name="Reader",
                                         auto_reset=False, last_batch_policy=policy)
                while True:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        pos = len(plan)
                        break
                    n = out["json"].shape[0]
                    b = self._to_batch(out, plan[pos:pos + n])
                    pos += n
                    carry.update(b.skipped)
                    if len(b):
                        b.skipped = dict(+carry)
                        carry = Counter()
                        yield b
            except RuntimeError:
                # An undecodable member: DALI's pipeline is dead. Find the sample (a synchronous probe
                # over the batches that can be in flight), count it, and go on without it from `pos`.
                del it
                found = self._find_bad(plan[pos:pos + (PREFETCH + 1) * self.batch_size])
                if found is None:
                    raise
                i, reason = found
                self._bad[plan[pos + i][:2]] = reason
                self.skipped[reason] += 1
                carry[reason] += 1
                del plan[pos + i]

    def _members_ok(self, o: dict, row: int, meta: dict, entry) -> bool:
        """The sha256 of row ``row``'s JSON, FLAC and frame(s) against its metadata (host tensors)."""
        parts = {}
        for r in self._raw:
            n = int(o[f"rawlen:{r}"][row].reshape(-1)[0])
            ext = f"f{entry[2]:02d}.jpg" if r == "img" else r   # "img" is the planned frame's member
            parts[ext] = o[f"raw:{r}"][row][:n].numpy().tobytes()
        ok = check_members(meta, parts)
        return ok is True or (ok is None and not self.checksums)

    def _to_batch(self, o: dict, entries: list) -> Batch:
        """One DALI batch -> :class:`Batch`; ``entries`` are its rows' plan entries (row order)."""
        d, k = self.data, self.data.frames_per_clip
        # json, sr and lengths are CPU outputs of the pipeline: reading them costs no device sync.
        metas = []
        for row in o["json"]:
            try:
                m = json.loads(bytes(row.tolist()).decode())
                ok = isinstance(m, dict) and len(m["frame_times"]) == k
            except (ValueError, KeyError, TypeError):
                ok = False
            metas.append(m if ok else None)
        for j, m in enumerate(metas):
            if m is not None and not self._members_ok(o, j, m, entries[j]):
                metas[j] = "checksum"
        bad_sum = torch.tensor([m == "checksum" for m in metas], dtype=torch.bool)
        metas = [None if isinstance(m, str) else m for m in metas]
        bad_meta = torch.tensor([m is None for m in metas], dtype=torch.bool) & ~bad_sum
        sr = o["sr"].reshape(-1).round().long()
        lengths = o["alen"].reshape(-1).long()
        bad_sr = ~bad_meta & ~bad_sum & (sr != d.sample_rate)
        short = ~bad_meta & ~bad_sum & ~bad_sr & (lengths < frame_geometry(d.sample_rate).length)
        skipped = +Counter({"bad metadata": int(bad_meta.sum()), "wrong sample rate": int(bad_sr.sum()),
                            "short audio": int(short.sum()), "checksum": int(bad_sum.sum())})
        self.skipped.update(skipped)
        # Everything decided on the host stays there; the device sees only asynchronous uploads of
        # small host tensors (to_device) and never a read back: no sync on the device queue.
        keep = (~bad_meta & ~bad_sum & ~bad_sr & ~short).nonzero().reshape(-1)     # host data
        metas = [metas[i] for i in keep.tolist()]
        per = k if self.mode == "retrieval" else 1
        if not metas:
            return Batch(torch.empty(0), torch.empty(0), [], [], torch.empty(0, dtype=torch.long), dict(skipped))
        whole = len(metas) == len(lengths)      # the usual batch: nothing dropped, nothing to gather

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if whole else t[to_device(keep, t.device)]
        audio, lengths = rows(o["audio"]), lengths[keep]
        if self.mode == "retrieval":
            frames = rows(torch.stack([o[f"f{i}"] for i in range(k)], dim=1)).flatten(0, 1)
            fidx = torch.arange(k).repeat(len(metas))
        else:
            frames = rows(o["f0"])
            fidx = torch.tensor([entries[i][2] for i in keep.tolist()], dtype=torch.long)
        if self.mel == "dali":
            fb = rows(o["logmel"]).float()
        else:   # host lengths: validated on the host, uploaded without blocking
            fb = fbank(audio[:, : int(lengths.max())], d.sample_rate, lengths=lengths, check_finite=False)
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
        win = audio_windows(fb, to_device(fidx, fb.device), to_device(times, fb.device),
                            num_frames=to_device(nf, fb.device), data=d, length=self.audio_length,
                            shifts=None if shifts is None else to_device(shifts, fb.device))
        # Host-side (it feeds the packer): the same valid time columns as the torch loader.
        starts = window_starts(fidx, times, mode=d.window, total=d.fbank_frames, length=self.audio_length,
                               frames_per_clip=d.frames_per_clip)
        valid = valid_time_columns(nf.cpu().clamp(max=d.fbank_frames), starts, self.audio_length,
                                   self.patch_size, None if shifts is None else shifts.repeat_interleave(per))
        b = Batch(win, frames, [[str(x) for x in m.get("labels", [])] for m in metas], [str(m["id"]) for m in metas],
                  to_device(fidx, frames.device), dict(skipped), valid)
        return b.to(self.device, non_blocking=True) if self.device is not None else b
