"""The documentation: every public name has a docstring, every docstring example runs, and the
Sphinx site (API reference + tutorials) builds offline with warnings as errors."""

import doctest
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bayesdyn

PACKAGES = ["data", "distributions", "nn", "models", "guides", "inference", "evaluation"]


def _modules():
    for info in pkgutil.walk_packages(bayesdyn.__path__, "bayesdyn."):
        if not info.name.endswith("__main__"):
            yield importlib.import_module(info.name)


def test_every_public_name_is_documented():
    missing = []
    for package in PACKAGES:
        module = importlib.import_module(f"bayesdyn.{package}")
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.getdoc(obj) or "").strip():
                missing.append(f"bayesdyn.{package}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member) and \
                            not (inspect.getdoc(member) or "").strip() and \
                            not any(hasattr(base, attr) for base in obj.__mro__[1:]):
                        missing.append(f"bayesdyn.{package}.{name}.{attr}")
    assert not missing, missing


def test_docstring_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    examples = 0
    for module in _modules():
        for test in finder.find(module):
            examples += len(test.examples)
            runner.run(test)
    assert examples >= 5 and runner.failures == 0, runner.summarize()


@pytest.mark.slow
def test_sphinx_site_builds_with_warnings_as_errors(tmp_path):
    docs = Path(__file__).parents[1] / "docs"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q",
                           "-b", "html", str(docs), str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "html" / "api.html").is_file()
    assert len(list((tmp_path / "html" / "tutorials").glob("*.html"))) >= 3
