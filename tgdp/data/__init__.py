"""Data: Kaldi fbank, per-frame audio windows, the torch loader and the DALI pipeline over webdataset shards.

The exports below are resolved lazily (module ``__getattr__``), so ``import tgdp.data.shards`` or
``tgdp.data.clip_decode`` -- all that ``tgdp.prepare``'s worker processes need -- does not pay for
importing torch. ``from tgdp.data import fbank`` still gives the *function* (see ``_Package``).
PIL and soundfile are imported when a sample is decoded, DALI only by :mod:`tgdp.data.dali`.
"""

import importlib
import sys
import types

# public name -> submodule that defines it
_EXPORTS = {
    "LOG_FLOOR": "fbank", "fbank": "fbank", "mel_banks": "fbank", "num_frames": "fbank",
    "Batch": "loader", "ShardDataset": "loader", "TorchLoader": "loader", "make_loader": "loader",
    "read_manifest": "shards",
    "audio_windows": "windows", "cut_windows": "windows", "normalize": "windows", "pad_or_cut": "windows",
    "time_shift": "windows", "window_starts": "windows",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:  # AttributeError (not another error) lets `from tgdp.data import <submodule>` work
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    if name != "fbank":
        globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The import system sets ``tgdp.data.fbank`` to the *submodule* once it is imported, which would
    hide the exported *function* of the same name from ``__getattr__``. A data descriptor on the
    module's class wins over the module dict, so the name keeps meaning the function (as it did when
    this package imported it eagerly); the submodule stays reachable through ``sys.modules``."""

    @property
    def fbank(self):
        return importlib.import_module(f"{__name__}.fbank").fbank

    @fbank.setter
    def fbank(self, value) -> None:
        pass  # the import system's `setattr(package, "fbank", <module>)`: keep the function


sys.modules[__name__].__class__ = _Package
