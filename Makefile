# The two commands of the README. Both create ./.venv and install the project on first use.
#   make demo       - run the demo pipeline (offline, CPU, minutes)
#   make test       - run the test suite (what CI runs)
#   make demo-real  - QLoRA on a real LLM, SmolLM2-135M-Instruct (offline after its first fetch)
#   make lock       - refresh constraints.txt: the newest versions pyproject's ranges allow
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines: the CPU build of torch must be installed before anything that depends on
# it, or pip pulls a multi-GB CUDA build. On a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
# The exact versions the README's figures were measured with (torch aside: TORCH_SPEC).
LOCK := constraints.txt

.PHONY: demo demo-real test lint format install lock
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@# setuptools warns about any editable install of a flat layout (flows/, tasks/ next to
	@# instructflow/); nothing to act on, so it does not reach the console.
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/instructflow run -c configs/demo.yaml

demo-real: install
	$(VENV)/bin/instructflow run -c configs/smollm2-ch07.yaml

# Resolves pyproject's ranges afresh in a throwaway venv (what a new user without the lock
# would get today) and writes every version into $(LOCK). Re-measure the README after it.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q "$(TORCH_SPEC)"
	PYTHONWARNINGS=ignore .lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d): pip constraints for 'make install'."; \
	  echo "# torch is left to TORCH_SPEC (CPU build here, a CUDA build on GPU machines)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -iv '^torch=='; } > $(LOCK)
	rm -rf .lock-venv

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
