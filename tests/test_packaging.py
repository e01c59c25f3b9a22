"""What `pip install` gets: the kernels as tgdp.kernels (no top-level `kernels`), torch + numpy as the
only core dependencies, the data/plot/log stack in the `train` extra that README's main-job command
installs, and everything the test suite imports in the `test` extra."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STACK = {"pillow", "av", "soundfile", "matplotlib", "tqdm", "tensorboard"}


@pytest.fixture(scope="module")
def setup_kwargs():
    """The keyword arguments setup.py passes to setuptools.setup (nothing is built)."""
    captured = {}
    orig = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = orig
        os.chdir(cwd)
    return captured


def names(reqs):
    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_core_dependencies_are_torch_and_numpy(setup_kwargs):
    assert names(setup_kwargs["install_requires"]) == {"torch", "numpy"}
    extras = setup_kwargs["extras_require"]
    assert names(extras["train"]) == TRAIN_STACK
    assert TRAIN_STACK | {"pytest", "hypothesis", "triton"} <= names(extras["test"])


def test_flash_attn_minimum_has_unpadded_lse_and_custom_ops(setup_kwargs):
    (req,) = [r for r in setup_kwargs["extras_require"]["gpu"] if r.startswith("flash-attn")]
    version = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", req).group(1).split("."))
    assert version >= (2, 7, 0), req


def test_kernels_install_as_tgdp_kernels(setup_kwargs):
    packages = setup_kwargs["packages"]
    assert "tgdp.kernels" in packages and "tgdp" in packages
    assert not [p for p in packages if p == "kernels" or p.startswith("kernels.")]
    assert setup_kwargs["package_dir"] == {"tgdp.kernels": "kernels"}
    # The source checkout's way to the same files.
    assert (ROOT / "tgdp" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_no_module_imports_a_top_level_kernels_package():
    pattern = re.compile(r"^\s*(from\s+kernels[\s.]|import\s+kernels\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for d in ("tgdp", "kernels", "tests", "benchmarks")
                 for p in (ROOT / d).rglob("*.py") if "tgdp/kernels" not in p.as_posix()
                 and pattern.search(p.read_text())]
    assert not offenders


def test_readme_commands_install_the_extras_they_need():
    readme = (ROOT / "README.md").read_text()
    main_job = re.search(r"\*\*1\. .*?```bash\n(.*?)\n```", readme, re.S).group(1)
    tests = re.search(r"<!-- ci:test -->\n```bash\n(.*?)\n```", readme, re.S).group(1)
    assert 'pip install -e ".[train]"' in main_job and main_job.endswith("python -m tgdp.train")
    assert 'pip install -e ".[test]"' in tests


def test_wheel_holds_tgdp_kernels_and_no_top_level_kernels(tmp_path):
    """A regular (non-editable) build of a clean copy of the sources: the wheel pip would install."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("tgdp", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=junk)
    env = dict(os.environ, TGDP_NO_EXT="1")                # the C++ packer is not what is tested here
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(src)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("tgdp-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    for stem in ("__init__", "aot", "aot_variants", "masked_mse", "patch_global_scores", "topk_visible"):
        assert f"tgdp/kernels/{stem}.py" in files
    assert not [f for f in files if f.startswith("kernels/")]
    top_level = [f for f in files if f.endswith("top_level.txt")]
    assert top_level and zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["tgdp"]
