"""Fast model: attention backends, packed dual-path forward, static shapes (issue 4).

``FastCAVMAESync`` has the reference model's parameter names and protocol, so one state dict loads
into both; it is tested equal to :class:`tgdp.reference.model.CAVMAESync`.
"""

from tgdp.model.attention import SegmentGroup, VarlenMeta, resolve_backend, varlen_attention
from tgdp.model.fast import FastCAVMAESync
from tgdp.model.packing import view_layout

__all__ = ["FastCAVMAESync", "SegmentGroup", "VarlenMeta", "resolve_backend", "varlen_attention",
           "view_layout"]
