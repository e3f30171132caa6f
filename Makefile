# The two commands a newcomer needs: `make run` (embedded default) and `make test` (everything, for real).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := bash deploy/local/stack.sh
# make bench: stream size of the end-to-end run, and of each per-stage bench. DURATION=300 [RATE=10000] runs the
# sustained target instead (events = rate x duration); BENCH_ARGS passes anything else (e.g. --profile ledger).
EVENTS ?= 50000
STAGE_EVENTS ?= 50000
DURATION ?=
RATE ?=
BENCH_ARGS ?=

.PHONY: install run test test-unit stack-up stack-down stack bench bench-clean lint clean-var

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: install
	$(BIN)/billing run

# Installs, starts local Kafka + PostgreSQL (unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are given),
# then runs unit, integration and e2e tests against them.
test: install stack-up
	bash deploy/local/browser.sh
	eval "$$($(STACK) env)" && $(BIN)/python -m pytest -ra

test-unit: install
	$(BIN)/python -m pytest -ra tests/unit

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

# All four services as separate processes against the local stack (Ctrl-C stops them all).
stack: install stack-up
	eval "$$($(STACK) env)" && bash deploy/local/services.sh

# End to end on the real stack (four service processes; figures, plot and reconciliation under bench/results/),
# then the per-stage benches. See tests/bench/bench_e2e.py.
bench: install stack-up
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_e2e.py --events $(EVENTS) \
		$(if $(DURATION),--duration $(DURATION)) $(if $(RATE),--rate $(RATE)) $(BENCH_ARGS)
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_ingest.py --events $(STAGE_EVENTS)
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_rating.py --events $(STAGE_EVENTS)
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_ledger.py --debits $(STAGE_EVENTS)
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_projections.py --events $(STAGE_EVENTS)
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_cycle.py --subscriptions 2000
	$(BIN)/python tests/bench/bench_pricing.py

# Topics and schemas that interrupted benches left behind (bench* namespaces only).
bench-clean: install stack-up
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/clean.py

lint: install
	$(BIN)/ruff check libs services cli tests

clean-var:
	rm -rf var
