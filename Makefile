# hegelion-queue: `make run` (whole job) and `make test` set themselves up through `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HQ := $(BIN)/hegelion-queue
STAMP := $(VENV)/.installed
# the MLX build: CUDA 12/13 when nvidia-smi lists a GPU (by the driver's CUDA), else CPU (Metal on macOS);
# HEGELION_MLX_BACKEND=cpu|cuda12|cuda13|metal overrides (hegelion_queue/training/backend.py)
MLX_EXTRA = $(shell $(PYTHON) -m hegelion_queue.training.backend)
EXTRAS ?= dev,$(MLX_EXTRA)

DATASET ?=
SPLIT ?=
LIMIT ?=
SEED ?=
RUN ?=
N ?= 2
PYTEST_ARGS ?=
TEST_PROCS ?= 2

opt = $(if $(2),$(1) $(2))
SOURCE_ARGS = $(call opt,--dataset,$(DATASET)) $(call opt,--split,$(SPLIT)) $(call opt,--limit,$(LIMIT)) \
              $(call opt,--seed,$(SEED)) $(call opt,--run,$(RUN))

.DEFAULT_GOAL := help
.PHONY: help setup mlx-backend run demo ablation test redis enqueue workers trainer train status export retry-failed resume clean tables chaos bench up down kimi kimi-legacy multihost serve docs docs-serve

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

OPENBLAS = $(firstword $(wildcard /usr/lib/*/openblas-pthread/libopenblas.so.0))

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# OpenBLAS makes MLX's CPU training 2-3x faster than the wheel's reference BLAS (best effort: root + apt)
	@test -n "$(OPENBLAS)" || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1)) || \
	  echo "note: libopenblas0-pthread not installed; training runs on the slower reference BLAS"; }
	$(BIN)/python -m pip install -q --upgrade pip
	@$(PYTHON) -m hegelion_queue.training.backend --why
	@# another MLX build than last time: its backend package would clash with the new one
	@if [ -s $@ ] && [ "$$(cat $@)" != "$(EXTRAS)" ]; then \
	  $(BIN)/python -m pip uninstall -q -y mlx-cpu mlx-cuda-12 mlx-cuda-13 2>/dev/null || true; fi
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@echo "$(EXTRAS)" > $@

setup: $(STAMP) ## create .venv and install the project with the MLX build for this machine (safe to run again)
	@[ "$$(cat $(STAMP))" = "$(EXTRAS)" ] || $(MAKE) --no-print-directory -W pyproject.toml $(STAMP)

mlx-backend: ## which MLX build `make setup` installs here, and why (HEGELION_MLX_BACKEND overrides)
	@$(PYTHON) -m hegelion_queue.training.backend --why
	@echo "pip extras: $(EXTRAS)"

run: setup ## the whole job: Redis, enqueue (DATASET LIMIT SEED RUN), N workers until done, JSONL, adapter, eval
	-@test -x .kimi-code/bin/kimi || test -x .kimi-venv/bin/kimi || command -v kimi >/dev/null 2>&1 || \
	  $(MAKE) --no-print-directory kimi
	$(HQ) run $(SOURCE_ARGS) --workers $(N)

demo: setup ## the whole pipeline offline in ~2 min: bundled prompts, test teacher, tiny model -> data, adapter, plot, eval
	$(HQ) demo

ABLATION ?= artifacts/ablation
ABLATE = $(HQ) ablate --data $(ABLATION)/pydoc_dialectic.jsonl --model $(ABLATION)/tiny-qwen2 --out $(ABLATION)/runs \
         --seeds 3 --iters 200 --learning-rate 1e-3 --valid-fraction 0.1 --eval-prompts 16
ablation: setup ## the README's SCU evidence: arms x 3 seeds on CPython's pydoc text, tiny model (~45-60 min, 2 cores)
	HF_HUB_OFFLINE=1 $(BIN)/python -m hegelion_queue.training.pydoc_set $(ABLATION)/pydoc_dialectic.jsonl
	test -f $(ABLATION)/tiny-qwen2/model.safetensors || HF_HUB_OFFLINE=1 $(BIN)/python tests/make_tiny_model.py \
	  $(ABLATION)/tiny-qwen2 --corpus $(ABLATION)/pydoc_dialectic.jsonl --vocab 1024
	$(ABLATE) --arms plain,scu,fixed:0.1,fixed:1,fixed:10 --train-sizes 32,all --schedules cosine
	$(ABLATE) --arms scu:0.02 --train-sizes 32 --schedules cosine
	$(ABLATE) --arms plain,scu --train-sizes 32,all --schedules constant

test: setup ## the test suite (starts its own redis-servers; TEST_PROCS=2 files at a time, 0 for one process)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_PROCS) --dist loadfile $(PYTEST_ARGS)

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

serve: setup ## the dashboard, /metrics and /api/status on 127.0.0.1:8377 (HEGELION_SERVE_HOST/PORT/TOKEN)
	$(HQ) serve

docs: setup ## build the docs site into site/ (mkdocs, strict: a broken link or a missing page fails)
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup ## the docs site, live, on http://127.0.0.1:8000
	$(BIN)/mkdocs serve

clean: ## remove generated data under artifacts/ (keeps the venv)
	rm -rf artifacts/data artifacts/logs artifacts/adapters artifacts/bench

tables: setup ## regenerate docs/configuration.md's settings table, docs/operating.md's metric list and .env.example
	$(BIN)/python -m hegelion_queue.ops.tables

trainer: setup ## the trainer worker (trains each finished run once)
	$(BIN)/arq workers.trainer.WorkerSettings

train: setup ## enqueue training of RUN=… for the trainer worker (NOW=1: train in the foreground)
	$(HQ) train $(call opt,--run,$(RUN)) $(if $(NOW),--now)

chaos: setup ## chaos harness: SIGKILL workers (and ACP teachers), restart Redis, verify nothing lost (CHAOS_ARGS=--short)
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.chaos $(CHAOS_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.chaos --mode acp $(CHAOS_ARGS)

bench: setup ## the benchmark: ratios against baselines measured in the same run (BENCH_ARGS=--smoke for a quick one)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run $(BENCH_ARGS)

up: ## docker compose: Redis (AOF, password from .env) and N generator workers (N=…)
	docker compose up -d --scale generator=$(N)

down: ## docker compose: stop everything (volumes are kept)
	docker compose down

kimi: setup ## install Kimi Code CLI 2.1.0 into .kimi-code (with the system's Node >= 22.19, else a Node wheel in .venv)
	$(BIN)/python -m hegelion_queue.teacher.install --dir .kimi-code

KIMI_VERSION := 1.51.0
KIMI_PYTHON ?=
kimi-legacy: ## install the legacy kimi-cli 1.51.0 (archived) into .kimi-venv with any Python >= 3.12 (KIMI_PYTHON=…)
	@if .kimi-venv/bin/kimi --version >/dev/null 2>&1; then .kimi-venv/bin/kimi --version; exit 0; fi; \
	pyenv_pys=$$(command -v pyenv >/dev/null 2>&1 && ls -d "$$(pyenv root)"/versions/3.*/bin/python3 2>/dev/null | sort -rV); \
	for py in $(KIMI_PYTHON) python3.13 python3.12 $$pyenv_pys python3; do \
	  command -v $$py >/dev/null 2>&1 && $$py -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || continue; \
	  echo "installing kimi-cli $(KIMI_VERSION) into .kimi-venv with $$($$py -c 'import sys; print(sys.executable)')"; \
	  rm -rf .kimi-venv; $$py -m venv .kimi-venv && .kimi-venv/bin/pip install -q "kimi-cli==$(KIMI_VERSION)" && \
	    .kimi-venv/bin/kimi --version && exit 0; \
	done; \
	if command -v uv >/dev/null 2>&1; then rm -rf .kimi-venv; uv venv -q --python '>=3.12' .kimi-venv && \
	  uv pip install -q --python .kimi-venv/bin/python "kimi-cli==$(KIMI_VERSION)" && .kimi-venv/bin/kimi --version && exit 0; fi; \
	rm -rf .kimi-venv; echo "kimi-cli needs Python >= 3.12: install python3.13 (or uv), or set KIMI_PYTHON=/path/to/python3.13, then run make kimi-legacy"; exit 1

MULTIHOST_ARGS ?=
multihost: setup ## several hosts in network namespaces (root): 200 prompts, a cut link, a Redis restart (MULTIHOST_ARGS=--short)
	PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 $(BIN)/python tests/multihost.py $(MULTIHOST_ARGS)
