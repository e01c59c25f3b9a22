"""Decode one video into the stored sample: 16 JPEG frames, 16 kHz FLAC audio, metadata.

Used by ``python -m tgdp.prepare`` (one call per clip, in worker processes). PyAV decodes on the
CPU, so VP9, MJPEG and H.264 sources all work. Frame ``i`` is the decoded frame nearest to
``t_i = i · min(duration, 10) / 16`` s (ties go to the earlier frame), resized (short side
``img_size``, bicubic) and centre-cropped to ``img_size``, JPEG q=90 RGB (gray sources become RGB).
The audio is one channel, resampled to 16 kHz, its first 10.24 s stored as 16-bit FLAC:
``channels="first"`` keeps the first channel (the official rule), ``"mix"`` the mean of all
channels. A clip whose stored audio peaks below 1e-4 is kept and flagged ``silent``; one that is
silent on the chosen channel while another channel is not (a mono mic on the right channel; a
phase-inverted pair that mixes to nothing) is also flagged ``silent_channel``, with the per-channel
peaks in ``channel_peaks``, and ``tgdp.prepare`` lists it in its flag report.

A broken input raises :class:`ClipSkipped` with a ``reason`` from :data:`REASONS`:

- ``zero_length``: the file is empty; ``unreadable``: missing, or no container can be opened
- ``no_video`` / ``no_audio``: the stream is absent
- ``undecodable_video`` / ``undecodable_audio``: the stream exists but not one frame/sample decodes
- ``truncated``: decoding stops (end of data or a decode error) before the last sampled frame
  (tolerance ``max(1.5 frames, 5 % of the span)``), or the audio ends more than
  ``max(0.5 s, 10 %)`` before ``min(duration, 10.24 s)``
- ``duplicate_id`` (a second input with an id already used), ``worker_died`` (the process decoding
  it died twice, e.g. killed by the OOM killer) and ``error`` (anything unexpected, with the
  exception text) are assigned by :mod:`tgdp.prepare`.

Heavy imports (PyAV, numpy, PIL, soundfile) happen inside the functions.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClipInput", "ClipSkipped", "REASONS", "CHANNELS", "decode_clip", "MAX_VIDEO_S", "AUDIO_S",
           "SILENCE_PEAK", "JPEG_QUALITY"]

REASONS = ("zero_length", "unreadable", "no_video", "no_audio", "undecodable_video",
           "undecodable_audio", "truncated", "duplicate_id", "worker_died", "error")
CHANNELS = ("first", "mix")
MAX_VIDEO_S = 10.0       # frames are sampled over the first 10 s (spec §5.1)
AUDIO_S = 10.24          # 1024 fbank frames at a 10 ms hop
SILENCE_PEAK = 1e-4      # |x| below this everywhere = silent (flagged, kept)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ClipInput:
    source: str                      # absolute path of the video
    id: str
    labels: tuple[str, ...] = ()


class ClipSkipped(Exception):
    """A clip that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_clip(item: ClipInput, *, img_size: int = 224, num_frames: int = 16,
                sample_rate: int = 16000, channels: str = "first") -> tuple[dict, bytes, list[bytes]]:
    """Decode one clip into ``(meta, flac_bytes, [jpeg_bytes] * num_frames)``.

    ``channels``: "first" or "mix" (module doc). Raises :class:`ClipSkipped` for a broken input
    (see the module docstring for the reasons).
    """
    if channels not in CHANNELS:
        raise ValueError(f"channels={channels!r} must be one of {list(CHANNELS)}")
    import av
    import numpy as np
    import soundfile as sf

    path = Path(item.source)
    if not path.is_file():
        raise ClipSkipped("unreadable", "file not found")
    if path.stat().st_size == 0:
        raise ClipSkipped("zero_length", "0 bytes")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ClipSkipped("unreadable", f"{type(e).__name__}: {e}") from None
    with container:
        if not container.streams.video:
            raise ClipSkipped("no_video", "no video stream")
        if not container.streams.audio:
            raise ClipSkipped("no_audio", "no audio stream")
        vs, aus = container.streams.video[0], container.streams.audio[0]
        duration = _duration(container, vs)
        if duration is None or duration <= 0:
            raise ClipSkipped("unreadable", f"unknown duration ({duration})")
        span = min(duration, MAX_VIDEO_S)
        targets = [i * span / num_frames for i in range(num_frames)]
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        rate = vs.average_rate or vs.guessed_rate
        fps = float(rate) if rate else None
        dec = _Decoder(vs, aus, targets, origin, fps, sample_rate, min(duration, AUDIO_S))
        dec.run(container)

    # ---- video verdict
    if not dec.chosen or dec.chosen[0] is None:
        raise ClipSkipped("undecodable_video", dec.v_error or "no frame decoded")
    last_t = dec.last_t
    tol = max(1.5 / fps if fps else 0.0, 0.05 * span)
    if dec.pending and last_t < targets[-1] - tol:
        raise ClipSkipped("truncated", f"video ends at {last_t:.3f} s, frame {num_frames - 1} is at "
                                       f"{targets[-1]:.3f} s ({dec.v_error or 'end of data'})")
    # ---- audio verdict
    every = dec.audio()                           # [channels, n]
    if every.shape[1] == 0:
        raise ClipSkipped("undecodable_audio", dec.a_error or "no sample decoded")
    need = min(duration, AUDIO_S)
    got = every.shape[1] / sample_rate
    if got < need - max(0.5, 0.1 * need):
        raise ClipSkipped("truncated", f"audio ends at {got:.3f} s of {need:.3f} s "
                                       f"({dec.a_error or 'end of data'})")
    every = every[:, :int(round(AUDIO_S * sample_rate))]
    audio = np.clip(every[0] if channels == "first" else every.mean(axis=0), -1.0, 1.0)
    peaks = [round(float(np.abs(c).max()), 6) for c in every]
    silent = bool(np.abs(audio).max() < SILENCE_PEAK)
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    jpgs = [_to_jpeg(img, img_size) for img in dec.images]
    meta = {"id": item.id, "labels": list(item.labels), "duration": duration, "fps": fps,
            "num_frames": num_frames, "frame_times": targets, "frame_pts": dec.chosen_t,
            "sample_rate": sample_rate, "num_samples": int(audio.size), "silent": silent,
            "channels": channels, "channel_peaks": peaks,
            "silent_channel": silent and max(peaks) >= SILENCE_PEAK,
            "source_sample_rate": int(aus.sample_rate or 0), "source": item.source}
    return meta, buf.getvalue(), jpgs


def _duration(container, vs) -> float | None:
    if container.duration is not None:
        return container.duration / 1e6
    if vs.duration is not None and vs.time_base is not None:
        return float(vs.duration * vs.time_base)
    return None


class _Decoder:
    """One demux pass over both streams: picks the frames nearest to ``targets`` and collects the
    resampled audio (every channel), stopping each stream as soon as it has what it needs."""

    def __init__(self, vs, aus, targets, origin, fps, sample_rate, audio_s):
        import av
        self.vs, self.aus, self.targets, self.origin, self.fps = vs, aus, targets, origin, fps
        self.sample_rate, self.need = sample_rate, int(round(audio_s * sample_rate))
        self.chosen: list = [None] * len(targets)
        self.chosen_t: list[float] = [0.0] * len(targets)
        self.pending = list(range(len(targets)))
        self.prev = None                          # (time, frame) of the last decoded video frame
        self.last_t = -1.0
        self.n_frames = 0
        self.v_error = self.a_error = None
        self.chunks: list = []
        self.have = 0
        self.a_offset = None                      # time of the first audio sample, s
        self.resampler = av.AudioResampler(format="fltp", rate=sample_rate)

    def run(self, container) -> None:
        import av
        v_done = a_done = False
        try:
            for packet in container.demux(self.vs, self.aus):
                if packet.stream is self.vs and not v_done:
                    try:
                        for frame in packet.decode():
                            self._video(frame)
                    except av.FFmpegError as e:
                        self.v_error = f"video decode: {e}"
                    v_done = not self.pending or self.v_error is not None
                elif packet.stream is self.aus and not a_done:
                    try:
                        for frame in packet.decode():
                            self._audio(frame, self.resampler.resample(frame))
                    except av.FFmpegError as e:
                        self.a_error = f"audio decode: {e}"
                    a_done = self.have >= self.need or self.a_error is not None
                if v_done and a_done:
                    break
        except av.FFmpegError as e:  # the demuxer itself failed: the data ends early
            self.v_error = self.v_error or f"read: {e}"
            self.a_error = self.a_error or f"read: {e}"
        if self.a_error is None:
            try:
                self._audio(None, self.resampler.resample(None))
            except av.FFmpegError as e:
                self.a_error = f"audio flush: {e}"
        for i in self.pending:            # end of data: the remaining targets take the last frame
            if self.prev is not None:
                self._choose(i, *self.prev)
        # Convert while the decoder is alive; one image per distinct frame (short clips repeat frames).
        images: dict[int, object] = {}
        for f in self.chosen:
            if f is not None and id(f) not in images:
                images[id(f)] = f.to_image()
        self.images = [images.get(id(f)) for f in self.chosen]
        self.prev = None

    def _video(self, frame) -> None:
        t = frame.time - self.origin if frame.time is not None else self.n_frames / (self.fps or 1.0)
        self.n_frames += 1
        while self.pending and self.targets[self.pending[0]] < t:
            i = self.pending.pop(0)
            target = self.targets[i]
            # nearest frame; a tie goes to the earlier one
            if self.prev is not None and target - self.prev[0] <= t - target:
                self._choose(i, *self.prev)
            else:
                self._choose(i, t, frame)
        self.prev = (t, frame)
        self.last_t = t

    def _choose(self, i: int, t: float, frame) -> None:
        self.chosen[i], self.chosen_t[i] = frame, round(t, 6)

    def _audio(self, src_frame, frames) -> None:
        if self.a_offset is None and src_frame is not None and src_frame.time is not None:
            self.a_offset = src_frame.time - self.origin
        for f in frames:
            x = f.to_ndarray()                    # fltp: [channels, n]
            self.chunks.append(x)
            self.have += x.shape[1]

    def audio(self):
        """``[channels, n]`` at ``sample_rate``, aligned so that sample 0 is the clip's time 0."""
        import numpy as np
        x = np.concatenate(self.chunks, axis=1).astype(np.float32) if self.chunks else np.zeros((1, 0), np.float32)
        shift = int(round((self.a_offset or 0.0) * self.sample_rate))
        if x.shape[1] and shift > 0:  # audio starts late: the gap before it is silence
            x = np.concatenate([np.zeros((x.shape[0], shift), np.float32), x], axis=1)
        elif shift < 0:               # audio starts before the video's time 0
            x = x[:, -shift:]
        return x


def _to_jpeg(img, size: int) -> bytes:
    """PIL RGB image (``VideoFrame.to_image`` gives RGB for any pixel format, gray included) →
    short side ``size`` (bicubic), centre crop ``size``², JPEG q=90."""
    from PIL import Image
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
