"""tgdp: fast, tested TG-DP (Teacher-Guided Dual-Path) audio-visual pretraining on CAV-MAE Sync.

``import tgdp`` needs only torch and numpy: Triton, CUDA, DALI, FlashAttention and the compiled
packer extension are optional and detected where they are used.
"""

from tgdp import configs
from tgdp.configs import Config, paper, tiny

__version__ = "0.1.0"
__all__ = ["Config", "configs", "paper", "tiny", "__version__"]
