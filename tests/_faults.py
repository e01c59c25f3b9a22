"""Shared pieces of the fault-injection suite (tests/test_faults_*.py): run a command through the one
error path in this process, flip bytes, hash folders, small shard sets."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

from _train_helpers import SMALL
from tgdp.cli import run


def cli(module_main, prog: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """``tgdp.cli.run(prog, main, argv)`` in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run(prog, module_main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def train(argv: list[str], capsys) -> tuple[int, str, str]:
    from tgdp.train import main
    return cli(main, "tgdp.train", argv, capsys)


def small(out: Path, *extra: str) -> list[str]:
    """The shrunk tiny() run on the noise source into ``out`` (no progress-bar noise on stderr)."""
    return [*SMALL, "--train.out_dir", str(out), *extra]


def one_error_line(err: str) -> str:
    """The single stderr line of an expected failure (progress bars and notes ignored)."""
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def flip(path: Path, at: int, n: int = 16) -> None:
    """Invert ``n`` bytes of ``path`` starting at byte ``at``."""
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_data_offset(ckpt: Path, min_size: int = 4096) -> int:
    """Byte offset of the payload of the first tensor record of at least ``min_size`` bytes in a
    torch.save zip (so flipping there changes weights, not the pickle)."""
    import zipfile

    with zipfile.ZipFile(ckpt) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size >= min_size:
                with open(ckpt, "rb") as fh:   # local header: 30 bytes + name + extra
                    fh.seek(info.header_offset + 26)
                    name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
                return info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raise AssertionError(f"no tensor of {min_size} bytes in {ckpt}")


def member_offset(tar_path: Path, name: str) -> tuple[int, int]:
    """(data offset, size) of member ``name`` in a tar."""
    with tarfile.open(tar_path) as tar:
        m = tar.getmember(name)
        return m.offset_data, m.size


def jpeg_scan_offset(data: bytes) -> int:
    """First byte of the entropy-coded scan of a baseline JPEG (after the SOS header)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def rewrite_tar_without(tar_path: Path, drop: str) -> None:
    """Rewrite a tar without member ``drop`` (what ``tar --delete`` does); leaves its .idx as it was."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.name != drop]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
