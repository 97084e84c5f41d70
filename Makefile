# The README's two commands: `make demo` (main job on the embedded digits data) and `make test`.
# Each creates the virtual environment when it is missing, so both work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
export BAYESDYN_SMOKE ?=

.PHONY: demo test install install-dev lint docs clean

$(PY):
	"$$(tools/find-python)" -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/bayesdyn demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

docs: $(VENV)/.installed-dev  # the API reference and the tutorials, offline, into docs/_build/html
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache runs docs/_build docs/tutorials
