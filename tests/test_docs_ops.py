"""docs/ops.md's MAE drop-in example runs as written (so it cannot rot): the three code blocks of
its "Drop-in for an MAE" section, on the reference path and on the Triton kernels (interpreter)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tgdp import ops

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"


def drop_in_blocks() -> list[str]:
    text = DOC.read_text()
    section = text.split("## Drop-in for an MAE", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_blocks() -> dict:
    namespace: dict = {"__name__": "docs_ops"}
    for block in drop_in_blocks():
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_the_section_has_the_before_after_and_check_blocks():
    blocks = drop_in_blocks()
    assert len(blocks) == 3
    assert "def random_masking" in blocks[1] and "def forward_loss" in blocks[1]
    assert "ops.topk_visible" in blocks[1] and "ops.masked_mse" in blocks[1]
    assert "assert" in blocks[2]


def test_drop_in_matches_mae_on_the_reference_path():
    ns = run_blocks()
    assert ns["got"][0].shape == (2, 49, 768) and float(ns["got"][1].sum()) == 2 * 147


def test_drop_in_matches_mae_on_the_triton_kernels():
    kernels = pytest.importorskip("tgdp.kernels")
    with ops.force_triton(), kernels.record_launches() as launches:
        ns = run_blocks()
    assert ns["got"][0].shape == (2, 49, 768)
    assert {"_rank_kernel", "_gather_rows_kernel", "_scatter_rows_kernel", "_masked_mse_fwd_kernel",
            "_masked_mse_bwd_kernel"} <= {x.kernel for x in launches}
