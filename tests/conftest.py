"""Test session setup.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at the top of the
first file pytest loads. It lets the Triton kernels run (slowly) on the CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
