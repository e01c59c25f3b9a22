"""Plots: valid PNGs of the requested pixel size, t-SNE keeps clusters, bad inputs raise."""

import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tgdp.eval.__main__ import main
from tgdp.eval.plots import load_thumbnails, plot_loss_curves, plot_retrieval_examples, plot_tsne, read_log
from tgdp.eval.tsne import _conditional_p, tsne


pytestmark = pytest.mark.usefixtures("one_thread")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    with Image.open(path) as im:
        im.verify()                              # full decode check of the chunks / CRCs
    return w, h


def blobs(n_per: int, k: int, d: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 8
    y = torch.arange(k).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), d, generator=g), y


# ----------------------------------------------------------------------------- t-SNE

def test_affinities_hit_the_perplexity():
    x, _ = blobs(10, 3)
    p = _conditional_p(torch.cdist(x.double(), x.double()).square(), perplexity=5.0)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    torch.testing.assert_close(h, torch.full_like(h, np.log(5.0)), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(1), torch.ones(30, dtype=torch.float64))
    assert float(p.diagonal().abs().max()) == 0.0


def test_tsne_keeps_clusters():
    x, y = blobs(15, 4)
    emb = tsne(x, perplexity=10, iters=400, exaggeration_iters=100, seed=0)
    assert emb.shape == (60, 2) and torch.isfinite(emb).all()
    d = torch.cdist(emb, emb) + torch.eye(60) * 1e9
    nn_label = y[d.argmin(1)]
    assert (nn_label == y).float().mean() > 0.95
    torch.testing.assert_close(tsne(x, perplexity=10, iters=50, seed=3), tsne(x, perplexity=10, iters=50, seed=3))


def test_tsne_errors():
    with pytest.raises(ValueError, match="perplexity"):
        tsne(torch.randn(10, 3), perplexity=30)
    with pytest.raises(ValueError, match="NaN"):
        tsne(torch.tensor([[0.0, 1.0], [1.0, float("nan")], [2.0, 2.0], [3.0, 0.0]]), perplexity=1.5)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        tsne(torch.randn(10))


# ----------------------------------------------------------------------------- figures

def test_plot_tsne_png(tmp_path):
    a, y = blobs(8, 3, d=12)
    v = a + 0.5 * torch.randn_like(a)
    labels = [f"class {int(c)}" for c in y]
    out = plot_tsne(a, v, labels, tmp_path / "sub" / "tsne.png", iters=100, size=(640, 480))
    assert png_size(out) == (640, 480)
    assert not list((tmp_path / "sub").glob("*.tmp"))


@pytest.mark.parametrize("mutate, match", [
    (lambda a, v, lab: (a, v[:-1], lab), "same shape"),
    (lambda a, v, lab: (a, v, lab[:-1]), "labels for"),
    (lambda a, v, lab: (a[:0], v[:0], []), "N >= 1"),
    (lambda a, v, lab: (a.masked_fill(a > 1, float("nan")), v, lab), "audio embeddings contains NaN"),
])
def test_plot_tsne_bad_inputs(tmp_path, mutate, match):
    a, v = torch.randn(6, 4), torch.randn(6, 4)
    a[0, 0] = 2.0
    with pytest.raises(ValueError, match=match):
        plot_tsne(*mutate(a, v, ["x"] * 6), tmp_path / "t.png", iters=10)
    assert not (tmp_path / "t.png").exists()


def test_plot_retrieval_examples_png(tmp_path):
    n = 8
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    sim = torch.randn(n, n)
    out = plot_retrieval_examples(sim, imgs, imgs, [0, 3], tmp_path / "ex.png", k=5,
                                  labels=[f"c{i % 3}" for i in range(n)])
    assert png_size(out) == (160 * 6, 170 * 2)
    gray = [rng.random((20, 30)) for _ in range(n)]           # e.g. spectrogram queries
    out = plot_retrieval_examples(sim, gray, imgs, [1], tmp_path / "ex2.png", k=3, size=(500, 200))
    assert png_size(out) == (500, 200)


@pytest.mark.parametrize("kw, match", [
    ({"k": 9}, r"k=9 must be in \[1, 8\]"),
    ({"queries": [8]}, "row indices"),
    ({"queries": []}, "non-empty"),
    ({"sim": torch.full((8, 8), float("nan"))}, "NaN"),
    ({"query_images": [np.zeros((4, 4, 3))] * 7}, "7 query"),
    ({"candidate_images": [np.zeros((4, 4, 2))] * 8}, r"\[H, W, 3\]"),
    ({"size": (10, 10)}, ">= 64x64"),
])
def test_plot_retrieval_examples_bad_inputs(tmp_path, kw, match):
    args = {"sim": torch.randn(8, 8), "query_images": [np.zeros((4, 4, 3))] * 8,
            "candidate_images": [np.zeros((4, 4, 3))] * 8, "queries": [0], "path": tmp_path / "x.png"}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        plot_retrieval_examples(**args)


def test_loss_curves_from_jsonl_json_csv(tmp_path):
    recs = [{"step": s, "loss": 2.0 / (s + 1), "loss_rec": 1.0 / (s + 1), "lr": 1e-3} for s in range(20)]
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "log.json").write_text(json.dumps({"history": recs}))
    (tmp_path / "log.csv").write_text("step,loss,note\n" + "".join(f"{s},{1 / (s + 1)},x\n" for s in range(5)))
    assert read_log(tmp_path / "log.jsonl") == recs == read_log(tmp_path / "log.json")
    assert [float(r["loss"]) for r in read_log(tmp_path / "log.csv")] == [1 / (s + 1) for s in range(5)]
    for name in ("log.jsonl", "log.json", "log.csv"):
        out = plot_loss_curves(tmp_path / name, tmp_path / f"{name}.png", size=(600, 400))
        assert png_size(out) == (600, 400)
    assert main(["plot-log", "--log", str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "cli.png")]) == 0
    assert png_size(tmp_path / "cli.png") == (900, 500)


def test_loss_curves_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="neither JSON"):
        plot_loss_curves(tmp_path / "bad.jsonl", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"no numeric loss field in the log; fields are \['acc', 'step'\]"):
        plot_loss_curves([{"step": 1, "acc": 0.5}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'loss_v' has no numeric value"):
        plot_loss_curves([{"step": 1, "loss": 0.5, "loss_v": "nan"}], tmp_path / "x.png", keys=["loss", "loss_v"])
    with pytest.raises(ValueError, match="no log records"):
        plot_loss_curves([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- thumbnails from shards

def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_load_thumbnails_from_shard(tmp_path):
    colours = {"vid/a": (255, 0, 0), "vid/b": (0, 0, 255)}
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for key, (vid, rgb) in zip(("vid_a", "vid_b"), colours.items()):
            _add(tar, f"{key}.json", json.dumps({"id": vid, "labels": ["x"]}).encode())
            for f in range(16):
                buf = io.BytesIO()
                Image.new("RGB", (40, 40), rgb if f == 8 else (0, 255, 0)).save(buf, format="JPEG", quality=95)
                _add(tar, f"{key}.f{f:02d}.jpg", buf.getvalue())
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": [
        {"path": "shard-000000.tar", "count": 2}], "num_samples": 2}))
    th = load_thumbnails(tmp_path, ["vid/b", "vid/a"], frame=8, size=16)
    assert [t.shape for t in th] == [(16, 16, 3)] * 2
    assert th[0].mean((0, 1)).argmax() == 2 and th[1].mean((0, 1)).argmax() == 0   # blue, red
    with pytest.raises(ValueError, match=r"1 ids have no frame 8.*\['vid/c'\]"):
        load_thumbnails(tmp_path, ["vid/a", "vid/c"])
    with pytest.raises(ValueError, match="no manifest.json"):
        load_thumbnails(tmp_path / "nowhere", ["vid/a"])
