# Two entry points for a new user (see README): `make demo` and `make test`.
# Setup installs the pinned CPU torch wheel first so that pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all lint bench clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.done

demo: setup
	$(VENV)/bin/maskrcnn demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

# every speed benchmark beside torchvision (needs tvref: sh ../shared/tools/tvref/setup.sh); writes the
# section of this machine kind in benchmarks/RESULTS.md
bench: setup
	$(PY) -m benchmarks --write

lint: setup
	$(VENV)/bin/ruff check maskrcnn tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
