"""Plain, readable PyTorch twins of every fast path: the ops and the reference model.

Everything here is differentiable eager torch with no fusion tricks. The fast code (Triton kernels,
the packed fast model) is tested against these, and they are the fallback on machines without a GPU.
"""
