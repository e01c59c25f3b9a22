"""Fast model: attention backends, packed dual-path forward, static shapes (issue 4).

``FastCAVMAESync`` has the reference model's parameter names and protocol, so one state dict loads
into both; it is tested equal to :class:`tgdp.reference.model.CAVMAESync`.
"""

from tgdp.configs import ModelConfig
from tgdp.model.attention import SegmentGroup, VarlenMeta, resolve_backend, varlen_attention
from tgdp.model.fast import FastCAVMAESync
from tgdp.model.packing import view_layout
from tgdp.reference.model import CAVMAESync

__all__ = ["FastCAVMAESync", "SegmentGroup", "VarlenMeta", "build_encoder", "resolve_backend",
           "varlen_attention", "view_layout"]


def build_encoder(cfg: ModelConfig, impl: str = "fast", device=None):
    """The CAV-MAE Sync encoder for ``train.model_impl``: the fast model ("fast" / "auto") or the
    plain reference ("reference"). Both have the same parameter names and protocol."""
    if impl not in ("auto", "fast", "reference"):
        raise ValueError(f"model_impl={impl!r} must be 'auto', 'fast' or 'reference'")
    return (CAVMAESync if impl == "reference" else FastCAVMAESync)(cfg, device=device)
