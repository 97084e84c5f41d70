"""Sphinx configuration: the API reference from the docstrings and the tutorials (rendered, not
executed: the test suite executes them). ``make docs`` builds it offline into docs/_build."""

import shutil
from pathlib import Path

import bayesdyn

ROOT = Path(__file__).resolve().parents[1]

project = "bayesdyn"
release = version = bayesdyn.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_nb"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
suppress_warnings = ["myst.header"]  # notebooks may skip heading levels

# the tutorials live in notebooks/: copy them in so Sphinx renders them
_tutorials = Path(__file__).parent / "tutorials"
_tutorials.mkdir(exist_ok=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy(notebook, _tutorials / notebook.name)
