"""Writes the tutorial notebooks ``notebooks/NAME.ipynb`` from their sources, the percent-format
scripts ``notebooks/sources/NAME.py`` (``# %%`` code cells, ``# %% [markdown]`` prose), which are
what to edit and review:

    python notebooks/build_notebooks.py

Notebooks are committed without outputs. ``make test`` checks that each is up to date with its
source and executes it in smoke mode (``BAYESDYN_SMOKE=1``: digits and a few epochs); by hand
they run in full mode."""

from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).parent
SOURCES = HERE / "sources"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of one source script, without outputs or cell metadata."""
    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata = {"kernelspec": KERNEL}
    for i, cell in enumerate(nb.cells):
        cell.metadata = {}
        cell.id = f"{source.stem}-{i}"  # stable ids: rebuilding changes nothing
    return nb


def main() -> None:
    for source in sorted(SOURCES.glob("*.py")):
        nbformat.write(build(source), HERE / f"{source.stem}.ipynb")


if __name__ == "__main__":
    main()
