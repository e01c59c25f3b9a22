"""tgdp.syncguard.HostSyncGuard: every host-reading op is named, on the CPU as it would be on a GPU."""

import numpy as np
import pytest
import torch

from tgdp.syncguard import HostSyncError, HostSyncGuard

X = torch.arange(-2.0, 4.0)

SYNCS = {
    "item": (lambda: X[0].item(), "_local_scalar_dense"),
    "float": (lambda: float(X[1]), "_local_scalar_dense"),
    "bool": (lambda: bool(X[2]), "_local_scalar_dense"),
    "if-any": (lambda: 1 if (X > 0).any() else 0, "_local_scalar_dense"),
    "tolist": (lambda: X.tolist(), "Tensor.tolist"),
    "numpy": (lambda: X.numpy(), "Tensor.numpy"),
    "np.asarray": (lambda: np.asarray(X), "Tensor.__array__"),
    "nonzero": (lambda: X.nonzero(), "aten.nonzero"),
    "argwhere": (lambda: torch.argwhere(X), "aten.nonzero"),   # argwhere is nonzero at dispatch
    "equal": (lambda: torch.equal(X, X), "aten.equal"),
    "allclose": (lambda: torch.allclose(X, X), "aten.allclose"),
    "masked_select": (lambda: X.masked_select(X > 0), "aten.masked_select"),
    "bool-index": (lambda: X[X > 0], "aten.index"),
    "bool-index_put": (lambda: X.clone().index_put_((X > 0,), torch.tensor(0.0)), "index_put"),
    "unique": (lambda: X.unique(), "unique"),
    "bincount": (lambda: torch.tensor([0, 2, 2]).bincount(), "aten.bincount"),
    "repeat_interleave": (lambda: X.repeat_interleave(torch.ones(6, dtype=torch.long)), "repeat_interleave"),
    # a 0-dim tensor where a Scalar is expected: the foreach Scalar overload reads it
    "foreach-lerp-tensor-weight": (lambda: torch._foreach_lerp_([X.clone()], [X], torch.tensor(0.5)),
                                   "_local_scalar_dense"),
    # a blocking copy to another device (meta stands in for the GPU: the rule is device-agnostic)
    "blocking-h2d": (lambda: X.to("meta"), "aten._to_copy"),
}

FREE = {
    "arith": lambda: (X * 2 + 1).sum(),
    "int-index": lambda: X[torch.tensor([0, 2])],
    "slice": lambda: X[1:3],
    "where": lambda: torch.where(X > 0, X, 0.0),
    "nonblocking-h2d": lambda: X.to("meta", non_blocking=True),
    "foreach-mul-tensor": lambda: torch._foreach_mul_([X.clone()], torch.tensor(0.5)),
    "repeat_interleave-sized": lambda: X.repeat_interleave(torch.ones(6, dtype=torch.long), output_size=6),
    "topk": lambda: X.topk(2),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_detects_host_reads(name):
    fn, expect = SYNCS[name]
    with HostSyncGuard(raise_on_sync=False) as g:
        fn()
    assert len(g.syncs) >= 1 and any(expect in s for s in g.syncs), g.syncs
    with pytest.raises(HostSyncError, match="host sync"), HostSyncGuard():
        fn()


@pytest.mark.parametrize("name", list(FREE))
def test_device_side_ops_pass(name):
    with HostSyncGuard() as g:
        FREE[name]()
    assert g.syncs == []


def test_counts_every_sync_and_leaves_no_mode_behind():
    with HostSyncGuard(raise_on_sync=False) as g:
        X.sum().item()
        X.tolist()
        torch.equal(X, X)
    assert g.syncs == ["aten._local_scalar_dense.default", "Tensor.tolist", "aten.equal.default"]
    X.tolist()          # outside: nothing recorded, nothing raised
    assert len(g.syncs) == 3


def test_sees_backward_ops():
    w = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum()

    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g

    with pytest.raises(HostSyncError), HostSyncGuard():
        (Bad.apply(w) * loss).sum().backward()


def test_cpu_is_host_flags_only_device_reads_and_copies():
    """With meta tensors standing in for device ones: host bookkeeping passes, device reads do not."""
    host = torch.arange(4)
    dev = torch.empty(4, device="meta")
    with HostSyncGuard(cpu_is_host=True) as g:
        host.tolist(), host.nonzero(), host[host > 1], int(host.max())   # host data: free
        host.to("meta", non_blocking=True)                                # asynchronous upload
        dev * 2
    assert g.syncs == []
    for fn in (lambda: host.to("meta"),                     # blocking upload
               lambda: dev.nonzero(),                       # a device read (meta cannot run it at all)
               lambda: dev.tolist()):
        with HostSyncGuard(raise_on_sync=False, cpu_is_host=True) as g:
            try:
                fn()
            except (NotImplementedError, RuntimeError):
                pass                                        # meta has no data; the op was still seen
        assert len(g.syncs) == 1, g.syncs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message; on a GPU it runs")
def test_cuda_sync_debug_says_it_needs_cuda():
    from tgdp.syncguard import cuda_sync_debug
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        with cuda_sync_debug():
            pass
