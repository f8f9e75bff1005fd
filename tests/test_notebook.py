"""The lecture notebook, notebooks/how_models_learn.ipynb, runs top to bottom in a fresh kernel
without an error, draws its pictures, and leaves nothing in the repository (its runs go to a
temporary directory). Skipped, with the reason, where nbclient or a Jupyter kernel is missing
(`pip install ".[test]"` installs both)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install nbmake)")
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install nbmake)")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "how_models_learn.ipynb"


def _untracked_or_changed() -> set:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


def test_lecture_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    # jupyter_core's path migration warns on import unless told which layout to use.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no python3 Jupyter kernel (pip install ipykernel)")
    # The kernel imports the lmlab this test imports (a source checkout's python/ included).
    import lmlab
    package_root = str(Path(lmlab.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    # The notebook trains into tempfile.mkdtemp(): here, inside this test's own directory.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = _untracked_or_changed()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    pictures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pictures >= 12, f"expected a picture per step, found {pictures}"
    assert _untracked_or_changed() == before, "the notebook wrote into the repository"
