# hegelion-queue: `make run` (whole job) and `make test` set themselves up through `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HQ := $(BIN)/hegelion-queue
STAMP := $(VENV)/.installed
EXTRAS ?= dev,train

DATASET ?=
SPLIT ?=
LIMIT ?=
SEED ?=
RUN ?=
N ?= 2
PYTEST_ARGS ?=

opt = $(if $(2),$(1) $(2))
SOURCE_ARGS = $(call opt,--dataset,$(DATASET)) $(call opt,--split,$(SPLIT)) $(call opt,--limit,$(LIMIT)) \
              $(call opt,--seed,$(SEED)) $(call opt,--run,$(RUN))

.DEFAULT_GOAL := help
.PHONY: help setup run test redis enqueue workers trainer status export retry-failed resume clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

setup: $(STAMP) ## create .venv and install the project (safe to run again)

run: setup ## the whole job: Redis, enqueue (DATASET LIMIT SEED RUN), N workers until done, JSONL
	$(HQ) run $(SOURCE_ARGS) --workers $(N)

test: setup ## the test suite (starts its own redis-server)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

redis: setup ## make sure Redis answers; start a local one with AOF under artifacts/redis/
	$(HQ) redis

enqueue: setup ## enqueue prompts: make enqueue DATASET=… SPLIT=… LIMIT=… SEED=… RUN=…
	$(HQ) enqueue $(SOURCE_ARGS)

workers: setup ## N generator workers in the foreground (Ctrl-C drains and stops)
	$(HQ) workers -n $(N)

status: setup ## where the run stands (RUN=…)
	$(HQ) status $(call opt,--run,$(RUN))

export: setup ## rebuild the run's JSONL from Redis (RUN=…)
	$(HQ) export $(call opt,--run,$(RUN))

retry-failed: setup ## re-enqueue the run's dead letters (RUN=…)
	$(HQ) retry-failed $(call opt,--run,$(RUN))

resume: setup ## close a paused run's circuit breaker (RUN=…)
	$(HQ) resume $(call opt,--run,$(RUN))

clean: ## remove generated data under artifacts/ (keeps the venv)
	rm -rf artifacts/data artifacts/logs artifacts/adapters artifacts/bench
