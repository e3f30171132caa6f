# The two commands a newcomer needs: `make run` (embedded default) and `make test` (everything, for real).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := bash deploy/local/stack.sh
EVENTS ?= 200000

.PHONY: install run test test-unit stack-up stack-down stack bench lint clean-var

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

bench: install stack-up
	eval "$$($(STACK) env)" && $(BIN)/python tests/bench/bench_pricing.py

lint: install
	$(BIN)/ruff check libs services cli tests

clean-var:
	rm -rf var
