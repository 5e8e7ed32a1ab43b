# streamtune developer entry points. `make test` and `make demo` need no Docker: scripts/bootstrap.sh
# prepares the virtualenv (the project with its dev and bench extras), redis-server and the Kafka
# jars; the integration tests and the demo start their own broker and Redis
# (workers/streamtune/devtools/stack.py). `make test` runs the whole suite (what .ci/run calls);
# `make test-unit` is tests/unit alone (no service, seconds), `make test-integration` the rest.

VENV ?= $(HOME)/.cache/streamtune/venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
CHAOS_ARGS ?=

.PHONY: help env test test-unit test-integration demo lint typecheck train bench chaos clean

help:
	@echo "targets: env test test-unit test-integration demo lint typecheck train bench chaos clean"
	@echo "vars:    VENV=$(VENV) PYTEST_ARGS=... DEMO_ARGS=... BENCH_ARGS=..."

env:
	@STREAMTUNE_VENV="$(VENV)" bash scripts/bootstrap.sh

# pytest exit 5 means "no tests collected": that is a failure here, with a message saying so.
# PYTEST_EXIT_FILE (optional, used by .ci/run) receives the raw pytest exit code.
test: TEST_PATHS :=
test-unit: TEST_PATHS := tests/unit
test-integration: TEST_PATHS := tests/integration
test test-unit test-integration: env
	@rc=0; $(PYTHON) -m pytest $(TEST_PATHS) $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$${PYTEST_EXIT_FILE:-}" ]; then echo "$$rc" > "$$PYTEST_EXIT_FILE"; fi; \
	if [ "$$rc" -eq 5 ]; then echo "make $@: FAILED - pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

demo: env
	$(VENV)/bin/streamtune demo $(DEMO_ARGS)

lint: env
	$(VENV)/bin/ruff check workers tests
	$(VENV)/bin/ruff format --check workers tests

typecheck: env
	$(VENV)/bin/mypy

train: env
	$(VENV)/bin/streamtune train --task all

# Fault-tolerance suite, long version: writes docs/chaos.md and docs/chaos.json.
chaos: env
	$(VENV)/bin/streamtune chaos $(CHAOS_ARGS)

bench: env
	$(VENV)/bin/streamtune bench throughput $(BENCH_ARGS)
	$(VENV)/bin/streamtune bench update $(BENCH_ARGS)

# Build and tool caches only; the virtualenv and ~/.cache/streamtune (torch, Kafka jars) are kept.
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build
	find workers tests -name __pycache__ -type d -prune -exec rm -rf {} +
