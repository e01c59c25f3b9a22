"""The DALI path as it runs on a GPU, checked on the CPU (issue 10: 6, 7, g).

- The pipeline built with ``device_id=0`` (DALI 2.4 builds the graph without CUDA; only ``build()``
  needs a GPU) places each operator where intended.
- Batch assembly after DALI (``DaliLoader._to_batch``) with the pipeline's device outputs (meta
  tensors stand in for CUDA ones) reads nothing back from the device and uploads host data without
  blocking.
- The DALI CPU threads default to the CPUs of the rank, not to ``data.num_workers``.
"""

import pytest
import torch

pytest.importorskip("nvidia.dali")

from test_loader import S, write_dataset  # noqa: E402
from tgdp.configs import DataConfig, apply_overrides, tiny  # noqa: E402
from tgdp.data import dali  # noqa: E402
from tgdp.data.dali import DaliLoader, build_pipeline, default_threads  # noqa: E402
from tgdp.syncguard import HostSyncGuard  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("dali_device")
    write_dataset(r, [3])
    return r


def _placement(pipe) -> tuple[dict, list]:
    pipe._build_graph()
    ops = {}
    for op in pipe._ops:
        ops.setdefault(op._op.schema_name, set()).add(op._op.device)
    return ops, [o.device for o in pipe._graph_outputs]


@pytest.mark.parametrize("retrieval", [False, True])
def test_gpu_pipeline_places_each_op(root, retrieval):
    paths = [str(root / "shard-000000.tar")]
    idx = [str(root / "shard-000000.idx")]
    pipe = build_pipeline(paths, idx, retrieval=retrieval, frames_per_clip=16, img_size=S, batch_size=2,
                          num_threads=2, device_id=0)
    ops, outs = _placement(pipe)
    assert ops["readers__Webdataset"] == {"cpu"}
    assert ops["decoders__Image"] == {"mixed"}            # nvJPEG: host parse + GPU decode
    assert ops["Resize"] == {"gpu"} and ops["CropMirrorNormalize"] == {"gpu"}
    assert ops["decoders__Audio"] == {"cpu"}              # DALI decodes FLAC on the CPU only
    nf = 16 if retrieval else 1
    # json, audio, alen, sr, frames..., then (raw bytes, length) of the FLAC and of each JPEG for the
    # member checksums: audio and frames leave on the GPU, the metadata and raw bytes on the host
    assert outs == ["cpu", "gpu", "cpu", "cpu"] + ["gpu"] * nf + ["cpu"] * (2 * (1 + nf))


def test_gpu_pipeline_with_dali_mel_computes_it_on_the_cpu(root):
    pipe = build_pipeline([str(root / "shard-000000.tar")], [str(root / "shard-000000.idx")], retrieval=False,
                          img_size=S, batch_size=2, device_id=0, mel="dali")
    ops, outs = _placement(pipe)
    assert ops["Spectrogram"] == {"cpu"} and ops["MelFilterBank"] == {"cpu"}
    assert outs[-1] == "gpu"


def _one_batch(root):
    """One raw output dict of the CPU pipeline and its plan entries."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    ld = DaliLoader(root, "train", img_size=S, batch_size=3, num_threads=1)
    plan, _ = ld._plan(0)
    it = DALIGenericIterator([ld._pipeline(plan)], ld._names, reader_name="Reader", auto_reset=False,
                             last_batch_policy=LastBatchPolicy.DROP)
    return ld, next(it)[0], plan[:3]


def _on_device(o: dict) -> dict:
    """The outputs a device_id=0 pipeline gives on the GPU (audio, frames) as meta tensors."""
    return {k: (torch.empty_like(v, device="meta") if k in ("audio", "f0") else v.clone()) for k, v in o.items()}


@pytest.mark.parametrize("drop", [False, True])
def test_batch_assembly_reads_nothing_back_from_the_device(root, drop):
    ld, o, entries = _one_batch(root)
    if drop:
        o["sr"][1] = 8000           # one wrong sample rate: the row is dropped (a device gather)
    ref = ld._to_batch({k: v.clone() for k, v in o.items()}, entries)
    ld.device = torch.device("meta")
    with HostSyncGuard(cpu_is_host=True) as g:
        b = ld._to_batch(_on_device(o), entries)
    assert g.syncs == []
    assert b.audio.device.type == b.frames.device.type == b.frame_idx.device.type == "meta"
    assert b.audio.shape == ref.audio.shape == (3 - drop, 416, 128) and b.frames.shape == ref.frames.shape
    assert b.ids == ref.ids and len(b.ids) == 3 - drop
    assert torch.equal(b.audio_valid, ref.audio_valid) and b.audio_valid.device.type == "cpu"


def test_dali_threads_default_to_the_rank_share_of_the_cpus(root, monkeypatch):
    monkeypatch.setattr(dali.os, "sched_getaffinity", lambda pid: set(range(48)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_threads() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert default_threads() == 2                     # at least 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert DaliLoader(root, "eval", img_size=S)._opts["num_threads"] == 48
    from tgdp.data.loader import make_loader
    cfg = apply_overrides(tiny(), {"data.loader": "dali", "data.num_workers": 1}).validate()
    assert make_loader(cfg, "eval", root=str(root))._opts["num_threads"] == 48   # not num_workers
    cfg = apply_overrides(cfg, {"data.dali_threads": 3}).validate()
    assert make_loader(cfg, "eval", root=str(root))._opts["num_threads"] == 3
    with pytest.raises(ValueError, match="data.dali_threads"):
        DataConfig(dali_threads=-1).validate()
