"""In one process: which parameters DDP leaves out, and FSDP2's per-block units on the fast model
(a 1-rank gloo group; the 2-rank runs are in tests/test_distributed.py)."""

import pytest
import torch
import torch.distributed as dist

from _train_helpers import SMALL_DICT
from tgdp.configs import apply_overrides, tiny
from tgdp.model import FastCAVMAESync
from tgdp.training.distributed import FORWARD_METHODS, DistInfo, _fsdp_shard, unused_parameters
from tgdp.training.loop import build_method, draw_rec_masks
from tgdp.training.sources import RandomSource

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("over", [{}, {"loss.w_dis": 0.0, "masking.guide": "random", "loss.rec_grad_to_cls": True}])
def test_unused_parameters_are_exactly_those_without_a_gradient(impl, over):
    """DDP runs with find_unused_parameters=False and ignores these names: a used one would not be
    averaged across ranks, an unused one missing from the list would stall the reducer."""
    cfg = apply_overrides(tiny(), {**SMALL_DICT, "train.model_impl": impl, **over}).validate()
    torch.manual_seed(0)
    method = build_method(cfg, CPU.device)
    b = RandomSource(cfg).next()
    gen = torch.Generator().manual_seed(0)
    method(b.audio, b.frames, gen, masks_rec=draw_rec_masks(cfg, 0, CPU)).loss.backward()
    no_grad = sorted(n for n, p in method.student.named_parameters() if p.grad is None)
    assert no_grad == sorted(unused_parameters(method.student))
    assert len(no_grad) == 8 * (2 * cfg.model.modality_specific_depth + cfg.model.decoder_depth)
    assert set(no_grad) <= set(method.student.state_dict())      # still in the checkpoint


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _is_sharded(block) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(block.attn.qkv.weight, DTensor)


@pytest.mark.parametrize("bf16", [False, True])
def test_fsdp2_shards_each_fast_block_and_gathers_it_only_for_its_forward(one_rank_group, bf16):
    """Every block is an FSDP unit: while one block runs, it is unsharded and every other block is
    sharded (the old fast model was one unit: all of it gathered for the whole forward). With the
    bf16 policy the block computes in bf16 on the fp32 activations it is given."""
    from torch.distributed.fsdp import FSDPModule

    cfg = apply_overrides(tiny(), {**SMALL_DICT, "train.fsdp_bf16": bf16}).validate()
    torch.manual_seed(0)
    model = FastCAVMAESync(cfg.model)
    ref = FastCAVMAESync(cfg.model)
    ref.load_state_dict(model.state_dict())
    _fsdp_shard(model, cfg, FORWARD_METHODS)
    blocks = [blk for lst in (model.blocks_a, model.blocks_v, model.blocks_u, model.decoder_blocks) for blk in lst]
    assert all(isinstance(blk, FSDPModule) for blk in blocks) and isinstance(model, FSDPModule)
    seen = []

    def pre(blk, args, kwargs):
        others = [_is_sharded(o) for o in blocks if o is not blk]
        seen.append((_is_sharded(blk), all(others), args[0].dtype))
    hooks = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in blocks]
    b = RandomSource(cfg).next()
    rec = draw_rec_masks(cfg, 0, CPU)
    out = model.student_forward(b.audio, b.frames, rec, rec)
    for h in hooks:
        h.remove()
    # each block's pre-hook runs after FSDP's own (registered first): unsharded itself, others sharded
    assert len(seen) == len(blocks)        # each block once (both views / all joint passes packed)
    assert all(not own and others for own, others, _ in seen), seen
    want = torch.bfloat16 if bf16 else torch.float32
    assert all(dt == want for _, _, dt in seen) and out.cls_a.dtype == want
    expect = ref.student_forward(b.audio, b.frames, rec, rec)
    tol = dict(atol=0.1, rtol=0.1) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred_v.float(), expect.pred_v, **tol)
