# The Makefile is the interface: CI and the README call these targets, never copies of their commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chorus-installed
TORCH_VERSION ?= 2.13.0
MOSHI_VERSION ?= 0.2.13

.PHONY: install run test chaos lint bench soak compose-check k8s-check checkpoints clean gpu-wheelhouse

# Two steps on purpose: torch first (the local CPU build), then moshi without its pins
# (it pins torch<2.10, sounddevice and bitsandbytes, none needed to run its models), then us.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet --no-deps moshi==$(MOSHI_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[all,dev,deploy]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chorus up

# The fault-injection suite (tests/chaos, marker `chaos`) is slow: `make test` runs only its smoke subset.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not chaos or chaos_smoke"

# Every fault case against real processes: kill -9, SIGSTOP, Redis restarts, abusive clients (~3 min),
# and the long WebSocket fuzz of tests/security (~5 min).
chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos tests/chaos tests/security

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/vulture
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench

# The wheels bench/gpu/run.sh installs on a GPU machine that has only torch (docs/performance.md, "Dialogue").
gpu-wheelhouse: $(STAMP)
	PYTHON=$(BIN)/python bench/gpu/wheelhouse.sh .whl

# 30 minutes of sessions starting and ending on a whole stack: memory flat, no frame or slot lost
# (bench/soak.py; results in bench/results/soak.json, quoted in docs/reliability.md).
soak: $(STAMP)
	$(BIN)/python -m bench.soak --minutes $(or $(SOAK_MINUTES),30)

# Offline checks of the deploy files with tools installed from PyPI (docs/deploy.md, "Validation").
# `make test` runs them too: tests/deploy/test_manifests.py calls the same functions.
compose-check: $(STAMP)
	$(BIN)/python -m chorus.devtools.deploy_check compose

k8s-check: $(STAMP)
	$(BIN)/python -m chorus.devtools.deploy_check k8s

checkpoints: $(STAMP)
	$(BIN)/chorus dev make-checkpoints checkpoints

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
