"""Every tutorial notebook runs top to bottom in smoke mode (digits, a few epochs)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESDYN_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors


def test_exits_notebook_matches_its_cell_list():
    """notebooks/exits.ipynb is generated from EXITS in build_notebooks.py (rebuild after edits)."""
    import importlib.util

    here = Path(__file__).parents[1] / "notebooks"
    spec = importlib.util.spec_from_file_location("build_notebooks", here / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    nb = nbformat.read(here / "exits.ipynb", as_version=4)
    assert [c.source for c in nb.cells] == [src for _, src in builder.EXITS]
