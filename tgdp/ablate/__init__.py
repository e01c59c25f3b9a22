"""Ablation studies: ``python -m tgdp.ablate`` (see :mod:`tgdp.ablate.__main__`).

- :mod:`tgdp.ablate.variants` — named sets of config overrides (built-ins + a TOML file);
- :mod:`tgdp.ablate.runner` — one (variant, seed): train with the ordinary loop, evaluate, resume;
- :mod:`tgdp.ablate.stats` — mean ± std and the paired t-interval against the baseline;
- :mod:`tgdp.ablate.report` — ``ablation.md`` / ``ablation.json`` / ``ablation.png``.
"""

from tgdp.ablate.stats import paired_ci, t_quantile
from tgdp.ablate.variants import BUILTIN, Variant, load_variants

__all__ = ["BUILTIN", "Variant", "load_variants", "paired_ci", "t_quantile"]
