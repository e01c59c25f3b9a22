"""Test-media factories: tiny videos with known content, and a corrupt-media set.

Every video frame ``k`` carries its index as a bar code: ``CODE_BITS`` horizontal stripes, stripe
``j`` "on" when bit ``j`` of ``k`` is set (a centre crop only removes columns of a landscape frame,
so the stripes survive prepare's resize + crop). :func:`read_code` decodes it back from a JPEG, so a
test can tell exactly which source frame was stored. The audio is a tone, clicks at known times,
silence, or nothing, in any container/codec PyAV encodes (MJPEG/PCM in .mkv/.avi, VP9/Opus in
.webm, H.264/AAC in .mp4).
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

CODE_BITS = 7
ON_RGB = (230, 40, 40)    # red "on" stripes: a swapped channel order would read as "off"
OFF_RGB = (20, 20, 60)
_DEFAULT_AUDIO = {".mkv": "pcm_s16le", ".avi": "pcm_s16le", ".webm": "libopus", ".mp4": "aac"}
_VIDEO_CODEC = {"mjpeg": ("mjpeg", "yuvj420p"), "vp9": ("libvpx-vp9", "yuv420p"),
                "h264": ("libx264", "yuv420p")}


def code_frame(k: int, width: int, height: int, gray: bool = False) -> np.ndarray:
    """Frame ``k`` as ``[H, W, 3]`` uint8 (or ``[H, W]`` if gray): stripes = bits of ``k``."""
    on = np.array((200, 200, 200) if gray else ON_RGB, np.uint8)
    off = np.array((30, 30, 30) if gray else OFF_RGB, np.uint8)
    img = np.empty((height, width, 3), np.uint8)
    edges = np.linspace(0, height, CODE_BITS + 1).round().astype(int)
    for j in range(CODE_BITS):
        img[edges[j]:edges[j + 1]] = on if (k >> j) & 1 else off
    return img[:, :, 0].copy() if gray else img


def read_code(jpg: bytes) -> int:
    """Inverse of :func:`code_frame` on a stored (resized, cropped, JPEG) frame."""
    arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), np.float32)
    h = arr.shape[0]
    edges = np.linspace(0, h, CODE_BITS + 1)
    k = 0
    for j in range(CODE_BITS):
        lo, hi = int(edges[j] + 0.3 * (edges[j + 1] - edges[j])), int(edges[j] + 0.7 * (edges[j + 1] - edges[j]))
        if arr[lo:hi, :, 0].mean() > 115:
            k |= 1 << j
    return k


def make_audio(seconds: float, sample_rate: int, *, kind: str = "tone", channels: int = 1,
               tone_hz: float = 440.0, amplitude: float = 0.3, clicks=(), seed: int = 0,
               inverted: bool = False) -> np.ndarray:
    """``[channels, N]`` float32 in [-1, 1]. Channel 0: ``kind`` ("tone", "silent", "clicks") plus a
    3 ms noise burst at each time in ``clicks``; channels >= 1: a 3 kHz tone (so a test can tell
    whether channel 0 was kept), or with ``inverted`` channel 0 phase-inverted (mixes to silence)."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    x = np.zeros((channels, n), np.float64)
    if kind == "tone":
        x[0] = amplitude * np.sin(2 * np.pi * tone_hz * t)
    elif kind not in ("silent", "clicks"):
        raise ValueError(f"unknown audio kind {kind!r}")
    rng = np.random.default_rng(seed)
    width = max(int(0.003 * sample_rate), 4)
    for tc in clicks:
        start = int(round(tc * sample_rate)) - width // 2
        burst = 0.9 * np.hanning(width) * rng.uniform(-1, 1, width)
        lo, hi = max(start, 0), min(start + width, n)
        x[0, lo:hi] += burst[lo - start:hi - start]
    for c in range(1, channels):
        x[c] = -x[0] if inverted else 0.3 * np.sin(2 * np.pi * 3000.0 * t)
    return np.clip(x, -1, 1).astype(np.float32)


def write_clip(path, *, codec: str = "mjpeg", seconds: float = 2.0, fps: int = 8,
               size: tuple[int, int] = (80, 56), audio: str | None = "tone", sample_rate: int = 16000,
               channels: int = 1, tone_hz: float = 440.0, clicks=(), gray: bool = False,
               faststart: bool = False, audio_codec: str | None = None, video: bool = True,
               inverted: bool = False) -> Path:
    """Encode a clip; the container comes from the suffix. ``audio=None``: no audio track;
    ``video=False``: audio only. Returns ``path``."""
    path = Path(path)
    opts = {"movflags": "faststart"} if faststart else {}
    w, h = size
    with av.open(str(path), "w", options=opts) as out:
        vs = None
        if video:
            name, pix = _VIDEO_CODEC[codec]
            vs = out.add_stream(name, rate=fps)
            vs.width, vs.height = w, h
            vs.pix_fmt = "gray" if gray else pix
        if audio is not None:
            acodec = audio_codec or _DEFAULT_AUDIO[path.suffix]
            as_ = out.add_stream(acodec, rate=sample_rate)
            as_.layout = "mono" if channels == 1 else "stereo"
        if vs is not None:
            for k in range(int(round(seconds * fps))):
                img = code_frame(k, w, h, gray)
                frame = av.VideoFrame.from_ndarray(img, format="gray" if gray else "rgb24")
                frame.pts = k
                frame.time_base = Fraction(1, fps)
                out.mux(vs.encode(frame))
            out.mux(vs.encode())
        if audio is not None:
            x = make_audio(seconds, sample_rate, kind=audio, channels=channels, tone_hz=tone_hz,
                           clicks=clicks, inverted=inverted)
            _encode_audio(out, as_, x, sample_rate)
    return path


def _encode_audio(out, stream, x: np.ndarray, sample_rate: int) -> None:
    fmt = stream.codec_context.codec.audio_formats[0]
    layout = "mono" if x.shape[0] == 1 else "stereo"
    hop = 960
    for i in range(0, x.shape[1], hop):
        seg = x[:, i:i + hop]
        if fmt.name.startswith("s16"):
            arr = (seg * 32767).round().astype(np.int16)
        else:
            arr = seg.astype(np.float32)
        if not fmt.is_planar:
            arr = np.ascontiguousarray(arr.T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(arr, format=fmt.name, layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = i
        frame.time_base = Fraction(1, sample_rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def write_bad_audio_clip(path, *, seconds: float = 2.0, fps: int = 8) -> Path:
    """A valid MJPEG video with a FLAC audio stream whose packets are zero bytes (no FLAC sync code,
    so not one packet decodes)."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mjpeg", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 80, 56, "yuvj420p"
        as_ = out.add_stream("flac", rate=16000)
        as_.layout = "mono"
        for k in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(code_frame(k, 80, 56), format="rgb24")
            frame.pts = k
            out.mux(vs.encode(frame))
        out.mux(vs.encode())
        for i in range(int(seconds * 1000 / 72)):
            pkt = av.Packet(bytes(300))
            pkt.stream = as_
            pkt.time_base = Fraction(1, 1000)
            pkt.pts = pkt.dts = i * 72
            out.mux(pkt)
    return path


def truncate(path, fraction: float) -> Path:
    """Cut a file to ``fraction`` of its bytes, in place."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


# File name -> expected skip reason (None = kept). Reason classes are tgdp.prepare.REASONS.
CORRUPT_EXPECTED = {
    "valid.mkv": None,                    # MJPEG + PCM 16 kHz mono
    "valid_vp9.webm": None,               # VP9 + Opus (decoded at 48 kHz)
    "rate44k_stereo.mp4": None,           # H.264 + AAC 44.1 kHz stereo: resampled, channel 0 kept
    "rate8k.mkv": None,                   # PCM 8 kHz: resampled up
    "gray.mp4": None,                     # H.264 gray pixel format: stored as RGB
    "silent.mkv": None,                   # all-zero audio: kept, flagged silent
    "truncated.mp4": "unreadable",        # cut at 50 %, index (moov) at the end: cannot be opened
    "truncated_faststart.mp4": "truncated",  # index first, data cut at 50 %: decodes half
    "no_audio.mkv": "no_audio",
    "audio_only.mkv": "no_video",
    "zero.mp4": "zero_length",
    "garbage.mp4": "unreadable",          # random bytes
    "bad_audio.mkv": "undecodable_audio",  # FLAC stream of all-zero packets
}


def make_corrupt_set(root) -> dict[str, str | None]:
    """Write the files of :data:`CORRUPT_EXPECTED` (2 s, tiny frames) into ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_clip(root / "valid.mkv")
    write_clip(root / "valid_vp9.webm", codec="vp9", sample_rate=48000)
    write_clip(root / "rate44k_stereo.mp4", codec="h264", sample_rate=44100, channels=2)
    write_clip(root / "rate8k.mkv", sample_rate=8000)
    write_clip(root / "gray.mp4", codec="h264", gray=True, sample_rate=44100)
    write_clip(root / "silent.mkv", audio="silent")
    truncate(write_clip(root / "truncated.mp4", codec="h264"), 0.5)
    truncate(write_clip(root / "truncated_faststart.mp4", codec="h264", faststart=True), 0.5)
    write_clip(root / "no_audio.mkv", audio=None)
    write_clip(root / "audio_only.mkv", video=False)
    (root / "zero.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    write_bad_audio_clip(root / "bad_audio.mkv")
    return dict(CORRUPT_EXPECTED)
