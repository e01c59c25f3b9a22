"""Retrieval metrics vs an independent nested-loop implementation of the official algorithm.

The reference below follows the official code path literally: per-pair mean of aligned
frame cosines in float64 Python/numpy loops (like SYNC's ``get_agg_sim_mat('diagonal_mean')``),
then per row a descending sort and a scan for positions equal to the diagonal score (like
TG-DP's ``compute_metrics``), pooling every match.
"""

import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tgdp.configs import tiny, to_dict
from tgdp.eval import common
from tgdp.eval.__main__ import main, run_retrieval
from tgdp.eval.retrieval import (format_table, metrics_from_counts, rank_counts, rank_counts_from_similarity,
                                 retrieval_metrics, similarity_matrix)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- reference

def ref_similarity(q: np.ndarray, c: np.ndarray) -> list[list[float]]:
    n, t, _ = q.shape
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            cos = [float(np.dot(q[i, k], c[j, k]) / (np.linalg.norm(q[i, k]) * np.linalg.norm(c[j, k])))
                   for k in range(t)]
            sim[i][j] = sum(cos) / t
    return sim


def ref_metrics(sim: list[list[float]]) -> dict:
    entries = []
    for i, row in enumerate(sim):
        for pos, val in enumerate(sorted(row, reverse=True)):
            if val == row[i]:
                entries.append(pos)
    return {"R@1": 100.0 * float(sum(e == 0 for e in entries)) / len(entries),
            "R@5": 100.0 * float(sum(e < 5 for e in entries)) / len(entries),
            "R@10": 100.0 * float(sum(e < 10 for e in entries)) / len(entries),
            "MR": statistics.median(entries) + 1, "entries": len(entries)}


def ref_both(a: torch.Tensor, v: torch.Tensor) -> dict:
    a64, v64 = a.double().numpy(), v.double().numpy()
    return {"v2a": ref_metrics(ref_similarity(v64, a64)), "a2v": ref_metrics(ref_similarity(a64, v64))}


def assert_same(ours: dict, ref: dict) -> None:
    for key in ("v2a", "a2v"):
        assert ours[key]["entries"] == ref[key]["entries"], key
        for m in ("R@1", "R@5", "R@10", "MR"):
            assert ours[key][m] == ref[key][m], (key, m, ours[key][m], ref[key][m])


def exact_embeddings(n: int, t: int, d: int, n_patterns: int, seed: int) -> torch.Tensor:
    """Frames with 4 entries of +-1 (norm 2): every cosine is a multiple of 1/4, exact in fp32
    whatever the summation order, so ties are exact in both implementations."""
    g = torch.Generator().manual_seed(seed)
    pats = torch.zeros(n_patterns, d)
    for p in range(n_patterns):
        idx = torch.randperm(d, generator=g)[:4]
        pats[p, idx] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return pats[torch.randint(0, n_patterns, (n, t), generator=g)]


# ----------------------------------------------------------------------------- equality with the official algorithm

def test_random_embeddings_match_official():
    a, v = torch.randn(40, 16, 12), torch.randn(40, 16, 12)
    v[:20] += 1.5 * a[:20]                       # some signal so ranks spread over 0..N
    ours = retrieval_metrics(a, v, chunk=7)
    assert_same(ours, ref_both(a, v))
    assert ours["v2a"]["entries"] == 40 and 0 < ours["v2a"]["R@1"] < 100


def test_duplicated_videos_tie_like_official():
    a, v = torch.randn(30, 16, 8), torch.randn(30, 16, 8)
    a[10:15], v[10:15] = a[0:5], v[0:5]           # 5 videos duplicated: exact ties in both directions
    ours = retrieval_metrics(a, v, chunk=8)
    ref = ref_both(a, v)
    assert_same(ours, ref)
    assert ours["a2v"]["entries"] == 40          # each duplicated row yields 2 entries (official quirk)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structured_exact_ties_match_official(seed):
    a = exact_embeddings(36, 16, 16, n_patterns=3, seed=seed)
    v = exact_embeddings(36, 16, 16, n_patterns=3, seed=seed + 100)
    v[::3] = a[::3]                              # aligned pairs
    v[1::6, :8] = a[1::6, :8]                    # half-aligned pairs: diagonal in the middle of ties
    ours = retrieval_metrics(a, v, chunk=5)
    ref = ref_both(a, v)
    assert_same(ours, ref)
    assert ref["v2a"]["entries"] > 36 or ref["a2v"]["entries"] > 36


def test_all_identical_videos():
    a = torch.ones(6, 16, 4)
    res = retrieval_metrics(a, a.clone())
    # every row ties with all 6 candidates: entries 0..5 per row -> R@1 = 1/6, MR = median(0..5)+1 = 3.5
    assert res["a2v"]["entries"] == 36
    assert res["a2v"]["R@1"] == pytest.approx(100 / 6)
    assert res["a2v"]["R@5"] == pytest.approx(500 / 6)
    assert res["a2v"]["MR"] == 3.5


def test_hand_computed_ties_and_alternatives():
    sim = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.2, 0.9], [0.3, 0.3, 0.3]])
    g, t = rank_counts_from_similarity(sim)
    assert g.tolist() == [0, 2, 0] and t.tolist() == [2, 1, 3]
    off = metrics_from_counts(g, t)               # entries [0, 1 | 2 | 0, 1, 2]
    assert off["entries"] == 6 and off["R@1"] == pytest.approx(100 * 2 / 6) and off["R@5"] == 100.0
    assert off["MR"] == 2.0                      # median(0,0,1,1,2,2) = 1
    opt = metrics_from_counts(g, t, ties="optimistic")    # ranks [0, 2, 0]
    assert opt["R@1"] == pytest.approx(200 / 3) and opt["MR"] == 1.0 and opt["entries"] == 3
    pes = metrics_from_counts(g, t, ties="pessimistic")   # ranks [1, 2, 2]
    assert pes["R@1"] == 0.0 and pes["MR"] == 3.0


def test_counts_to_metrics_match_explicit_expansion():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        g = torch.randint(0, 30, (n,), generator=gen)
        t = torch.randint(1, 4, (n,), generator=gen)
        entries = [r for gi, ti in zip(g.tolist(), t.tolist()) for r in range(gi, gi + ti)]
        m = metrics_from_counts(g, t)
        assert m["MR"] == float(np.median(entries)) + 1
        assert m["R@10"] == 100.0 * float(sum(e < 10 for e in entries)) / len(entries)


def test_chunking_does_not_change_counts():
    a, v = torch.randn(23, 16, 6), torch.randn(23, 16, 6)
    a[5] = a[3]
    v[5] = v[3]
    ref = rank_counts(a, v, chunk=23)
    for chunk in (1, 4, 22, 100):
        got = rank_counts(a, v, chunk=chunk)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_similarity_definition_and_direction():
    a, v = torch.randn(5, 16, 6), torch.randn(5, 16, 6) * 3
    s = similarity_matrix(v, a)                  # V->A: video queries (rows), audio candidates
    ref = torch.tensor(ref_similarity(v.double().numpy(), a.double().numpy()), dtype=torch.float64)
    torch.testing.assert_close(s.double(), ref, atol=1e-6, rtol=0)
    # a case where the two directions differ: audios 0 and 1 are identical, videos are not
    x, y, z = torch.eye(3)
    a = torch.stack([x, x + 0.5 * z, y]).unsqueeze(1).expand(3, 16, 3).clone()
    v = torch.stack([x, z, y]).unsqueeze(1).expand(3, 16, 3).clone()
    a[1] = a[0]
    res = retrieval_metrics(a, v)
    assert_same(res, ref_both(a, v))
    assert res["v2a"] != res["a2v"]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad, match", [
    (lambda a, v: (a, v[:3]), "same"),
    (lambda a, v: (a[:0], v[:0]), "empty"),
    (lambda a, v: (a.reshape(4, -1), v.reshape(4, -1)), r"\[N, T, D\]"),
    (lambda a, v: (a.long(), v), "floating"),
])
def test_bad_inputs_raise(bad, match):
    a, v = torch.randn(4, 16, 3), torch.randn(4, 16, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        retrieval_metrics(*bad(a, v))


def test_nan_raises_naming_the_rows():
    a, v = torch.randn(6, 16, 3), torch.randn(6, 16, 3)
    v[4, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"video embeddings contain NaN/Inf in 1 of 6 videos \(first rows \[4\]"):
        retrieval_metrics(a, v)


def test_bad_options_raise():
    a = torch.randn(4, 16, 3)
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(a, a, ties="random")
    with pytest.raises(ValueError, match="chunk"):
        rank_counts(a, a, chunk=0)


# ----------------------------------------------------------------------------- extraction, checkpoints, CLI

class StandIn(nn.Module):
    """Tiny model with the extract_features protocol: per-row features from the inputs."""

    def __init__(self, cfg):
        super().__init__()
        self.proj_a = nn.Linear(cfg.model.n_mels, cfg.model.embed_dim)
        self.proj_v = nn.Linear(3, cfg.model.embed_dim)
        self.nan = False

    def extract_features(self, audio, frames):
        cls_a = self.proj_a(audio.mean(1))
        cls_v = self.proj_v(frames.mean((2, 3)))
        return (cls_a * float("nan") if self.nan else cls_a), cls_v


def fake_loader(n_videos: int, t: int, batch: int, n_mels: int = 128):
    out = []
    for s in range(0, n_videos, batch):
        b = min(batch, n_videos - s)
        audio = torch.zeros(b * t, 8, n_mels)
        frames = torch.zeros(b * t, 3, 4, 4)
        # value = video * 100 + frame, so the video-major reshape can be checked exactly
        code = torch.tensor([(s + i) * 100 + k for i in range(b) for k in range(t)], dtype=torch.float32)
        audio += code.view(-1, 1, 1)
        frames += code.view(-1, 1, 1, 1)
        out.append(SimpleNamespace(audio=audio, frames=frames, ids=[f"vid{s + i}" for i in range(b)],
                                   labels=[[f"c{(s + i) % 3}"] for i in range(b)]))
    return out


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def extract_features(self, audio, frames):
        return audio[:, 0, :2] + self.w, frames[:, :2, 0, 0]


def test_extract_video_major_and_limit():
    feats = common.extract_video_features(Identity(), fake_loader(7, 16, 3), 16, max_videos=5)
    assert feats.a.shape == (5, 16, 2) and feats.ids == [f"vid{i}" for i in range(5)]
    expect = torch.tensor([[i * 100 + k for k in range(16)] for i in range(5)], dtype=torch.float32)
    assert torch.equal(feats.a[..., 0], expect) and torch.equal(feats.v[..., 1], expect)
    assert feats.labels[4] == ["c1"]


def test_extract_errors():
    with pytest.raises(ValueError, match="empty data"):
        common.extract_video_features(Identity(), [], 16)
    bad = fake_loader(2, 16, 2)
    bad[0].ids.append("extra")
    with pytest.raises(ValueError, match="16 frames per video"):
        common.extract_video_features(Identity(), bad, 16)
    m = StandIn(tiny())
    m.nan = True
    with pytest.raises(ValueError, match=r"NaN/Inf audio features for 2 of 2 videos \(first ids \['vid0', 'vid1'\]"):
        common.extract_video_features(m, fake_loader(2, 16, 2), 16)


def _save_ckpt(path, cfg, model):
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    cfg = tiny()
    m = StandIn(cfg)
    _save_ckpt(tmp_path / "ok.pt", cfg, m)
    loaded, cfg2 = common.load_checkpoint(tmp_path / "ok.pt", model_factory=StandIn)
    assert cfg2 == cfg and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.proj_a.weight, m.proj_a.weight, rtol=0, atol=0)
    # state dict from an embed_dim=96 model saved with a config that says 48
    from tgdp.configs import apply_overrides
    wrong = apply_overrides(cfg, {"model.embed_dim": 48, "model.decoder_embed_dim": 48})
    _save_ckpt(tmp_path / "bad.pt", wrong, m)
    msg = r"does not match its config \(model.embed_dim=48.*shape mismatches.*proj_a.weight"
    with pytest.raises(ValueError, match=msg):
        common.load_checkpoint(tmp_path / "bad.pt", model_factory=StandIn)
    torch.save({"model": {"other.weight": torch.zeros(1)}, "config": to_dict(cfg)}, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        common.load_checkpoint(tmp_path / "keys.pt", model_factory=StandIn)
    torch.save({"state_dict": {}}, tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match="'model' and 'config'"):
        common.load_checkpoint(tmp_path / "nocfg.pt", model_factory=StandIn)
    with pytest.raises(ValueError, match="does not exist"):
        common.load_checkpoint(tmp_path / "nope.pt", model_factory=StandIn)


def test_run_retrieval_writes_json_and_table(tmp_path):
    a = torch.randn(12, 16, 5)
    feats = common.VideoFeatures(a, a + 0.1 * torch.randn(12, 16, 5), [str(i) for i in range(12)], [["x"]] * 12)
    res = run_retrieval(feats, tmp_path, chunk=5)
    on_disk = json.loads((tmp_path / "retrieval.json").read_text())
    assert on_disk["v2a"] == res["v2a"] and on_disk["num_videos"] == 12
    assert res["v2a"]["R@1"] == 100.0 and res["a2v"]["MR"] == 1.0
    table = (tmp_path / "retrieval.md").read_text()
    assert table == format_table(res) + "\n" and "| V→A | 100.00 |" in table
    assert not list(tmp_path.glob("*.tmp"))
    # the CLI on saved features gives the same numbers
    feats.save(tmp_path / "f.pt")
    assert main(["retrieval", "--features", str(tmp_path / "f.pt"), "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "retrieval.json").read_text())
    assert cli["a2v"] == res["a2v"]


def test_per_row_metadata_and_frame_idx_checks():
    loader = fake_loader(4, 16, 2)
    for b in loader:                             # ids/labels repeated per row, like tgdp.data.Batch
        b.ids = [i for i in b.ids for _ in range(16)]
        b.labels = [lab for lab in b.labels for _ in range(16)]
        b.frame_idx = torch.arange(16).repeat(len(b.ids) // 16)
    feats = common.extract_video_features(Identity(), loader, 16)
    assert feats.ids == ["vid0", "vid1", "vid2", "vid3"] and feats.labels[1] == ["c1"]
    loader[1].ids[17] = "other"
    with pytest.raises(ValueError, match="rows 16..31 must be the 16 frames of one video"):
        common.extract_video_features(Identity(), loader, 16)
    loader = fake_loader(2, 16, 2)
    loader[0].frame_idx = torch.arange(32) % 8
    with pytest.raises(ValueError, match="frame_idx must be 0..15"):
        common.extract_video_features(Identity(), loader, 16)


# ----------------------------------------------------------------------------- integration: real model + loader

def write_shards(root, n: int, img: int = 32, labels=None) -> list[str]:
    """n tiny clips (1.2 s tone + 16 JPEGs) in one shard, labels alternating 'low'/'high' (or
    ``labels[i]``, a list of class names per clip)."""
    import io as _io

    import soundfile as sf
    from PIL import Image

    from tgdp.data.shards import ShardWriter, new_manifest, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = []
    with ShardWriter(root / "shard-000000.tar") as w:
        for i in range(n):
            key, sr = f"clip{i:03d}", 16000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(int(1.2 * sr)) / sr)
            buf = _io.BytesIO()
            sf.write(buf, wave.astype(np.float32), sr, format="FLAC", subtype="PCM_16")
            jpgs = []
            for f in range(16):
                im = _io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (img, img, 3), dtype=np.uint8)).save(im, "JPEG")
                jpgs.append(im.getvalue())
            lab = list(labels[i]) if labels is not None else ["low" if i % 2 == 0 else "high"]
            md = {"id": key, "labels": lab, "duration": 1.2, "fps": 8.0,
                  "num_frames": 16, "frame_times": [f * 1.2 / 16 for f in range(16)], "sample_rate": sr,
                  "num_samples": len(wave), "silent": False, "source": f"{key}.mkv"}
            w.write(key, md, buf.getvalue(), jpgs)
            ids.append(key)
    m = new_manifest(img_size=img)
    m["shards"].append({"path": "shard-000000.tar", "count": n})
    write_manifest(root, m)
    return ids


def real_checkpoint(tmp_path):
    ref = pytest.importorskip("tgdp.reference.model")
    pytest.importorskip("tgdp.data.loader")
    from tgdp.configs import apply_overrides
    cfg = apply_overrides(tiny(), {"model.img_size": 32, "data.num_workers": 0, "data.loader": "torch",
                                   "train.model_impl": "reference", "eval.batch_videos": 3}).validate()
    torch.manual_seed(0)
    model = ref.CAVMAESync(cfg.model)
    _save_ckpt(tmp_path / "ckpt.pt", cfg, model)
    return model, cfg


def test_cli_retrieval_with_real_model_and_loader(tmp_path):
    model, cfg = real_checkpoint(tmp_path)
    ids = write_shards(tmp_path / "shards", 5)
    argv = ["retrieval", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "shards"),
            "--out", str(tmp_path / "eval"), "--device", "cpu", "--save-features", "--plots"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "eval" / "retrieval.json").read_text())
    assert res["num_videos"] == 5 and res["num_frames"] == 16 and res["v2a"]["entries"] >= 5
    feats = common.VideoFeatures.load(tmp_path / "eval" / "features.pt")
    assert feats.ids == ids and feats.labels[1] == ["high"] and feats.a.shape == (5, 16, cfg.model.embed_dim)
    # independent check of video 4 (second batch): the model on the loader's own rows
    batch = list(common.make_retrieval_loader(cfg, str(tmp_path / "shards")))[1]
    model.eval()
    with torch.no_grad():
        ca, cv = model.extract_features(batch.audio, batch.frames)
    torch.testing.assert_close(feats.a[4], ca[16:32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.v[4], cv[16:32], atol=1e-5, rtol=1e-5)
    cov = res.pop("coverage")
    assert (cov["evaluated"], cov["in_manifest"], cov["skipped"]) == (5, 5, {})
    assert cov["line"].startswith("5 evaluated of 5 in the manifest")
    assert res == retrieval_metrics(feats.a, feats.v) | {"source": str(tmp_path / "ckpt.pt")}
    for png in ("tsne.png", "retrieval_a2v.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"


def test_real_checkpoint_vs_wrong_config_and_empty_data(tmp_path, capsys):
    model, cfg = real_checkpoint(tmp_path)
    from tgdp.configs import apply_overrides
    from tgdp.data.shards import new_manifest, write_manifest

    wrong = apply_overrides(cfg, {"model.img_size": 64})          # video pos-embed grid 2x2 -> 4x4
    _save_ckpt(tmp_path / "wrong.pt", wrong, model)
    with pytest.raises(ValueError, match=r"does not match its config \(model.embed_dim=96, model.depth=4, "
                                         r"model.img_size=64.*shape mismatches"):
        common.load_checkpoint(tmp_path / "wrong.pt")
    (tmp_path / "empty").mkdir()
    write_manifest(tmp_path / "empty", new_manifest(img_size=32))
    assert main(["retrieval", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("tgdp.eval: error: empty data")
    assert not (tmp_path / "eval" / "retrieval.json").exists()
