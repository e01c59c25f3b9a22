"""Build and install tgdp.

The C++ packer (csrc/, built through CMakeLists.txt) is optional: set ``TGDP_NO_EXT=1`` to skip it,
and a failed build only warns — ``tgdp.pack`` then uses its numpy fallback.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("TGDP_NO_EXT", "0") == "1":
            print("tgdp: TGDP_NO_EXT=1, skipping the C++ packer (numpy fallback is used)")
            return
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError, ImportError) as exc:  # optional extension
            # OSError: no cmake / compiler on PATH; ImportError: no pybind11 (--no-build-isolation).
            print(f"tgdp: WARNING: C++ packer build failed ({exc}); the numpy fallback will be used",
                  file=sys.stderr)

    def build_extension(self, ext: CMakeExtension):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_tmp = Path(self.build_temp).resolve() / ext.name
        build_tmp.mkdir(parents=True, exist_ok=True)
        cfg = ["-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
               f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DTGDP_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}"]
        subprocess.run(["cmake", ext.sourcedir, *cfg], cwd=build_tmp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_tmp, check=True)


# Everything beyond the ops: media decoding (prepare, loaders, demo set), training logs and progress,
# evaluation plots. `pip install tgdp` alone is the ops install: torch + numpy.
TRAIN = ["pillow>=10", "av>=12", "soundfile>=0.12", "matplotlib>=3.7", "tqdm>=4.60", "tensorboard>=2.14"]

setup(
    name="tgdp",
    version="0.1.0",
    description="Fast, tested TG-DP audio-visual pretraining (CAV-MAE Sync backbone)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The repository's kernels/ folder is the subpackage tgdp.kernels (never a top-level `kernels`).
    # A source checkout reaches it through the symlink tgdp/kernels; installs map it here.
    packages=[*find_packages(include=["tgdp", "tgdp.*"], exclude=["tgdp.kernels", "tgdp.kernels.*"]),
              "tgdp.kernels"],
    package_dir={"tgdp.kernels": "kernels"},
    ext_modules=[CMakeExtension("tgdp._packer", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    # torch is pinned by the caller first (README): a bare requirement could pull a CUDA build.
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        "train": TRAIN,
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "triton": ["triton>=3.0"],
        "test": [*TRAIN, "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "triton>=3.0",
                 "nvidia-dali-cuda120>=1.40"],
        # GPU-only: FlashAttention (CUDA build) and the DALI CUDA runtime. flash-attn >= 2.7.0: 2.5.x
        # pads the varlen softmax_lse to [B, H, max_seqlen] (the unpadded [H, total_q] layout came with
        # Dao-AILab/flash-attention#970, in 2.6), and before 2.7 its CUDA calls are not registered as
        # torch custom ops (#1139), so torch.compile breaks the graph at every attention call
        # ("unsupported builtin flash_attn_2_cuda.PyCapsule.fwd": 2.6.3 has it, 2.7.0 does not, #1341).
        "gpu": ["flash-attn>=2.7.0", "nvidia-dali-cuda120>=1.40"],
    },
    entry_points={"console_scripts": ["tgdp-train=tgdp.train:main"]},
)
