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

# The tests run after the linters, the format check and the type check, which fail fast; two
# test processes at a time, each test file in one of them (its fixtures are built once).
test: lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

# The edit loop's tier: the tests that run in this process in under a second or so (no recipe,
# tool or driver runs in subprocesses, marked e2e; no compilation or FID network, marked slow).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 -m "not e2e and not slow"

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
