# Set-up and entry points. `make demo` runs the main job, `make test` the test suite; both
# create (or reuse) the virtual environment in .venv first.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo asr-demo test test-fast lint benchmark gpu-check clean-venv

$(STAMP): pyproject.toml tools/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/bootstrap.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m recipes.studies.demo

# CTC fine-tuning of a pretrained and of a randomly initialized encoder on a synthesized
# hour of speech, evaluated on held-out voices (about twenty minutes on two cores).
asr-demo: $(STAMP)
	$(VENV)/bin/python -m recipes.studies.asr_demo

# The tests run after the linters, the format check and the type check, which fail fast.
test: lint
	$(VENV)/bin/python -m pytest

# The edit loop's tier: every test that runs in this process (no recipe, tool or driver runs
# in subprocesses, which are marked e2e).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

benchmark: $(STAMP)
	$(VENV)/bin/python tools/benchmark_quantizers.py

# The checks of a CUDA machine (CUDA against CPU, compile, bf16, FSDP2, memory, speed).
gpu-check: $(STAMP)
	$(VENV)/bin/python tools/gpu_check.py

clean-venv:
	rm -rf $(VENV)
