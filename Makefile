# DreamShot — `make help` lists the targets. Every target that needs the environment builds it first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?= smoke
ARGS ?=

.PHONY: help setup demo train test test-full bench-gpu lint format clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: EXP=<experiment> (train), ARGS='key=value ...' (config overrides)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install DreamShot (skipped when pyproject.toml is unchanged)

demo: $(STAMP) ## Tiny Wan on the toy world, CPU: train a LoRA (loss trend), draw a storyboard, score the toy benchmark
	$(BIN)/dreamshot train demo $(ARGS)
	$(BIN)/dreamshot generate examples/story.yaml --run outputs/demo --out outputs/demo/storyboard
	$(BIN)/dreamshot eval toy --run outputs/demo --out outputs/demo/eval/toy-r2s --redraw

train: $(STAMP) ## Train an experiment: make train EXP=smoke ARGS='trainer.max_steps=10'
	$(BIN)/dreamshot train $(EXP) $(ARGS)

STORY ?= examples/story.yaml
CKPT ?=
OUT ?= outputs/storyboard
.PHONY: generate
generate: $(STAMP) ## Draw a storyboard: make generate STORY=examples/story.yaml CKPT=outputs/demo [OUT=dir] (CKPT: run folder, .safetensors or .ckpt; none: bare model)
	@$(if $(CKPT),,echo "make generate: no CKPT given: drawing with the bare model, no LoRA (CKPT=outputs/demo uses a trained run)")
	$(BIN)/dreamshot generate $(STORY) $(ARGS) $(if $(CKPT),$$(test -d $(CKPT) && echo --run || echo --lora) $(CKPT),--base) --out $(OUT)

BENCH ?= toy
MODE ?= r2s
OUTPUTS ?=
EVAL_OUT ?=
.PHONY: eval
eval: $(STAMP) ## Score a benchmark: make eval BENCH=toy|dreamshot_test|vistorybench CKPT=outputs/demo [MODE=r2s|t2s|s2s] [OUTPUTS=dir of shots to score instead] [EVAL_OUT=dir; default outputs/eval/<run>-<bench>-<mode>]
	@$(if $(or $(CKPT),$(OUTPUTS)),,echo "make eval: no CKPT given: scoring the bare model, no LoRA")
	$(BIN)/dreamshot eval $(BENCH) $(ARGS) --mode $(MODE) $(if $(OUTPUTS),--outputs $(OUTPUTS),$(if $(CKPT),$$(test -d $(CKPT) && echo --run || echo --lora) $(CKPT),--base)) $(if $(EVAL_OUT),--out $(EVAL_OUT))

SWEEP ?=
GROUP ?= $(SWEEP)
BASELINE ?=
PRINT ?=
.PHONY: sweep report reproduce-toy
sweep: $(STAMP) ## Run an experiment's members one after another: make sweep SWEEP=toy_lambda_sweep [CKPT=run folder, for eval_time sweeps] [PRINT=1: cluster launch lines]
	$(BIN)/python -m dreamshot.report.sweep $(SWEEP) $(ARGS) $(if $(CKPT),--run $(CKPT)) $(if $(PRINT),--print-commands)

report: $(STAMP) ## Compare a group's runs: make report GROUP=toy_lambda_sweep [BASELINE=member] (table + plots in outputs/GROUP/report)
	$(BIN)/dreamshot report $(GROUP) $(if $(BASELINE),--baseline $(BASELINE))

reproduce-toy: $(STAMP) ## Tiny Wan on the toy world, CPU: train without and with RACL, score both on the toy benchmark, report [SEEDS="0 1 2": that pair per seed, one report over the seeds]
ifeq ($(strip $(SEEDS)),)
	$(BIN)/python -m dreamshot.report.sweep toy_reproduction $(ARGS) --eval toy
	$(BIN)/dreamshot report toy_reproduction
else
	for seed in $(SEEDS); do \
		$(BIN)/python -m dreamshot.report.sweep toy_reproduction $(ARGS) --eval toy seed=$$seed \
			'output_dir=outputs/toy_reproduction_seeds/seed'$$seed'/$${name}' || exit 1; \
	done
	$(BIN)/dreamshot report toy_reproduction_seeds $(foreach seed,$(SEEDS),$(foreach member,without_racl with_racl,\
		outputs/toy_reproduction_seeds/seed$(seed)/toy_reproduction/$(member)))
endif

test: $(STAMP) ## Fast CPU test suite (skips tests marked slow or gpu)
	$(BIN)/pytest -q -m "not slow and not gpu" $(ARGS)

test-full: $(STAMP) ## Every test, slow ones included (gpu tests run where CUDA is present)
	$(BIN)/pytest -q $(ARGS)

bench-gpu: $(STAMP) ## On a CUDA machine: the GPU checks of one group (CHECKS=first by default; CHECKS=all for every group: throughput, MFU, memory, the gpu tests, peers, sampler settings, context parallelism; logs: benchmarks/logs)
	PATH=$(BIN):$$PATH bash benchmarks/gpu_checks.sh

lint: $(STAMP) ## Ruff lint and format check
	$(BIN)/ruff check dreamshot tests benchmarks
	$(BIN)/ruff format --check dreamshot tests benchmarks

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix dreamshot tests benchmarks
	$(BIN)/ruff format dreamshot tests benchmarks

clean: ## Remove run outputs (keeps .venv)
	rm -rf outputs .pytest_cache
