"""``import tgdp`` and a full TG-DP training step work with neither Triton, DALI, FlashAttention,
the compiled packer nor CUDA (the CPU-only machine every user and CI has)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    # Block the optional packages: an import of any of them now raises ImportError.
    for name in ("triton", "nvidia", "nvidia.dali", "flash_attn", "flash_attn_interface", "tgdp._packer"):
        sys.modules[name] = None
    import torch
    import tgdp, tgdp.ops, tgdp.method, tgdp.model, tgdp.pack, tgdp.train, tgdp.eval
    import tgdp.data, tgdp.data.loader, tgdp.prepare
    from tgdp.configs import load
    from tgdp.method import TGDP
    from tgdp.model.fast import FastCAVMAESync

    assert not tgdp.pack.HAS_EXTENSION
    cfg = load("tiny", overrides=["--model.depth", "2", "--model.modality_specific_depth", "1",
                                  "--model.img_size", "32", "--model.audio_length", "64"])
    method = TGDP(cfg, FastCAVMAESync(cfg.model))
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(2, cfg.model.audio_length, cfg.model.n_mels)
    frames = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    out = method(audio, frames, g)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n, p in method.student.named_parameters()
               if n.startswith("blocks_a.0.attn"))
    leaked = [m for m in ("triton", "nvidia.dali", "flash_attn") if sys.modules.get(m) is not None]
    assert not leaked, leaked
    print("OK", float(out.loss))
    """
)


def test_import_and_train_step_without_optional_packages():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK")


MINIMAL = textwrap.dedent(
    """
    import sys
    # The ops install (`pip install tgdp`): torch + numpy only. Block the train extra, Triton and
    # the rest; an import of any of them now raises ImportError.
    blocked = ("PIL", "av", "soundfile", "matplotlib", "tqdm", "tensorboard", "torch.utils.tensorboard",
               "triton", "nvidia", "nvidia.dali", "flash_attn", "flash_attn_interface", "tgdp._packer")
    for name in blocked:
        sys.modules[name] = None
    import torch
    import tgdp, tgdp.ops
    from tgdp import ops

    scores = torch.randn(2, 10)
    tokens = torch.randn(2, 10, 4, requires_grad=True)
    ids_keep, ids_restore, mask, visible = ops.topk_visible(scores, 3, tokens)
    visible.sum().backward()
    q = torch.randn(1, 2, 5, 4)
    assert ops.patch_global_scores(q, q, scale=0.5).shape == (1, 4)
    pred = torch.randn(2, 4, 4, requires_grad=True)
    ops.masked_mse(pred, torch.randn(2, 1, 4, 4), mask[:, :4], 2, True).backward()
    assert tokens.grad is not None and pred.grad is not None
    assert tgdp.paper().model.embed_dim == 768
    leaked = sorted(m for m in blocked if sys.modules.get(m) is not None)
    assert not leaked, leaked
    print("OK")
    """
)


def test_ops_with_only_torch_and_numpy():
    r = subprocess.run([sys.executable, "-c", MINIMAL], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK")
