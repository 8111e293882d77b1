# The two commands of the README. Both create ./.venv and install the project on first use.
#   make demo   - run the demo pipeline (offline, CPU, minutes)
#   make test   - run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines: the CPU build of torch must be installed before anything that depends on
# it, or pip pulls a multi-GB CUDA build. On a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint format install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@# setuptools warns about any editable install of a flat layout (flows/, tasks/ next to
	@# instructflow/); nothing to act on, so it does not reach the console.
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/instructflow run -c configs/demo.yaml

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
