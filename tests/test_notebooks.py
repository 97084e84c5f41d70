"""Every tutorial notebook is built from its source and runs top to bottom in smoke mode
(digits, a few epochs)."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
SOURCES = sorted((FOLDER / "sources").glob("*.py"))


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", FOLDER / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_source_has_its_up_to_date_notebook():
    assert SOURCES and [s.stem for s in SOURCES] == [n.stem for n in NOTEBOOKS]
    build = _builder().build
    for source in SOURCES:
        committed = nbformat.read(FOLDER / f"{source.stem}.ipynb", as_version=4)
        fresh = build(source)
        assert [(c.cell_type, c.source) for c in committed.cells] == \
            [(c.cell_type, c.source) for c in fresh.cells], \
            f"{source.stem}.ipynb is stale: run python notebooks/build_notebooks.py"


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
