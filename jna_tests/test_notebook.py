"""Executes notebooks/quickstart.ipynb top to bottom on the CPU and checks what it prints.

The notebook runs in a fresh Jupyter kernel (nbclient, kernel "python3": ipykernel's spec, which
jupyter_client launches with this interpreter, so the kernel sees the same environment and jna).
The kernel inherits this process's environment, with JAX_PLATFORMS=cpu forced so the notebook
takes its small CPU sizes wherever the suite runs. Besides "no cell raised", the test parses the
lines the notebook prints for the reader and checks them numerically.
"""

from __future__ import annotations

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    """The cell's stdout/stderr streams and plain-text results, joined."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"the notebook printed no line matching {pattern!r}; it printed:\n{text}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after a full run on the CPU (raises if any cell raised)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    old = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the kernel inherits this process's environment
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(ROOT)}},
        ).execute()
    finally:
        if old is None:
            del os.environ["JAX_PLATFORMS"]
        else:
            os.environ["JAX_PLATFORMS"] = old
    return nb


def test_notebook_is_clean():
    """Stored without outputs or execution counts, so diffs stay readable."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_on_cpu(executed):
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert all(cell.execution_count is not None for cell in code)
    text = "\n".join(_text(cell) for cell in code)

    # It ran on the CPU, where auto resolves to the reference backend, and installed nothing.
    assert "jax default backend: cpu" in text
    assert "already importable" in text

    # na2d (plain, dilated, causal, strided) agrees with dense masked softmax attention.
    assert _number(r"max abs error vs dense: (\S+)", text) < 1e-4
    # The unfused ops: logits match a gathered window, and QK -> softmax -> AV matches na2d.
    assert _number(r"na2d_qk vs gathered logits: max abs error (\S+)", text) < 1e-4
    assert _number(r"vs fused na2d: max abs error (\S+)", text) < 1e-4

    # The neighborhood pictures' key counts: full windows everywhere except the causal edge query.
    assert re.search(r"kernel 5 +keys seen by .*: \[25, 25, 25\]", text)
    assert re.search(r"kernel 5, causal \(both axes\) +keys seen by .*: \[25, 25, 5\]", text)

    # The timing table has a row with finite times.
    row = re.search(r"\| 32x32 \| 7 \| reference \| (\S+) \| xla \| (\S+) \|", text)
    assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, text

    # Training: the loss fell clearly and the classifier beats chance on held-out data.
    first = _number(r"loss: first (\S+)", text)
    last = _number(r"loss: first \S+ last (\S+)", text)
    assert last < 0.7 * first, (first, last)
    assert _number(r"test accuracy: (\S+)", text) > 0.75

    # Two figures were drawn (neighborhood patterns, attention weights).
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
