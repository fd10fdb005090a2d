# The pipeline as a DAG of file targets: each stage's finished output (its summary.json, written last and
# moved into place atomically) is the target, so `make sft` builds pretrain first and does nothing the
# second time. Edit the profile YAML or the data and the affected stages rebuild.
#
#   make sft rm ppo                      the whole pipeline on the default tiny profile (CPU, minutes)
#   make sft PROFILE=gpt2                another profile (configs/<PROFILE>.yaml)
#   make sft ARGS="sft.lr=3e-4"          config overrides (a changed value rebuilds the stages it affects)
#   make sft LAUNCH="accelerate launch --config_file configs/accelerate/ddp.yaml -m"   N GPUs
#   make ppo LAUNCH="accelerate launch --config_file configs/accelerate/zero3.yaml -m" DeepSpeed ZeRO-3

PROFILE ?= tiny
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
LAUNCH ?= $(PY) -m
# torch is installed on its own, first: a pinned release takes the CPU wheel on CPU machines. On a GPU
# machine pick the CUDA build you want, e.g. make TORCH="torch==2.13.0" TORCH_INDEX=<your CUDA wheel index>.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG := configs/$(PROFILE).yaml
RUN := runs/$(PROFILE)
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: FORCE help install pretrain sft rm ppo ptx-ablation summary report test test-all lint clean clean-stages

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE)  ARGS=\"...\"  LAUNCH=\"$(LAUNCH)\""

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pipeline.distributed  # compile DeepSpeed's CPU ops once (~1 min), not inside the first launch
	touch $@

install: $(STAMP)  ## create .venv and install torch, DeepSpeed + the pipeline (done automatically by every target)

pretrain: $(RUN)/pretrain/summary.json  ## stage 1: continued pretraining on the corpus
sft: $(RUN)/sft/summary.json            ## stage 2: supervised fine-tuning on demonstrations (builds pretrain)
rm: $(RUN)/rm/summary.json              ## stage 3: reward model on ranked completions (builds sft)
ppo: $(RUN)/ppo/summary.json            ## stage 4: PPO-ptx against the reward model (builds sft and rm)

# Per-stage stamps: rewritten only when that stage's part of the resolved config (profile + ARGS) or its
# data files change, so a new sft.lr rebuilds sft but not pretrain.
$(RUN)/.stamps/%.json: FORCE $(STAMP)
	@$(PY) -m pipeline stamp --config $(CONFIG) $(ARGS)

$(RUN)/pretrain/summary.json: $(RUN)/.stamps/pretrain.json pipeline/stages/pretrain.py
	$(LAUNCH) pipeline pretrain --config $(CONFIG) $(ARGS)

$(RUN)/sft/summary.json: $(RUN)/pretrain/summary.json $(RUN)/.stamps/sft.json pipeline/stages/sft.py
	$(LAUNCH) pipeline sft --config $(CONFIG) $(ARGS)

$(RUN)/rm/summary.json: $(RUN)/sft/summary.json $(RUN)/.stamps/rm.json pipeline/stages/rm.py
	$(LAUNCH) pipeline rm --config $(CONFIG) $(ARGS)

$(RUN)/ppo/summary.json: $(RUN)/sft/summary.json $(RUN)/rm/summary.json $(RUN)/.stamps/ppo.json pipeline/stages/ppo.py pipeline/rollout.py
	$(LAUNCH) pipeline ppo --config $(CONFIG) $(ARGS)

# The ptx ablation: the same PPO run with the pretraining term off (ppo.ptx_coef=0), from the same SFT
# policy and reward model, same seed; then both runs' final metrics side by side.
ABLATION := $(RUN)/ablation-ptx0
$(ABLATION)/ppo/summary.json: $(RUN)/ppo/summary.json
	$(LAUNCH) pipeline ppo --config $(CONFIG) $(ARGS) run_dir=$(ABLATION) ppo.init=$(RUN)/sft ppo.reward_model=$(RUN)/rm ppo.ptx_coef=0

ptx-ablation: $(ABLATION)/ppo/summary.json  ## PPO-ptx (make ppo) vs plain PPO (ppo.ptx_coef=0): held-out corpus loss and reward
	@$(PY) -m pipeline compare $(RUN)/ppo $(ABLATION)/ppo

FORCE:

summary: $(STAMP)  ## print the final metrics of this profile's finished stages
	@$(PY) -m pipeline summary --config $(CONFIG) $(ARGS)

report: $(STAMP)  ## HTML report with plots of the finished stages: runs/<PROFILE>/report/index.html
	@$(PY) -m pipeline report --config $(CONFIG) $(ARGS)

# make chat: the profile's PPO policy; STAGE=sft (or pretrain) picks another stage, DIR=<path> any finished
# stage directory, CHAT_ARGS="--greedy --temperature 0.7 ..." the sampling options (python -m pipeline chat -h).
STAGE ?= ppo
DIR ?= $(RUN)/$(STAGE)
CHAT_ARGS ?=
chat: $(STAMP)  ## talk to a finished stage's policy in the terminal (STAGE=ppo|sft|pretrain, DIR=..., CHAT_ARGS=...)
	@$(PY) -m pipeline chat $(DIR) $(CHAT_ARGS)

test: $(STAMP)  ## the test suite, including the real tiny pretrain → sft chain (a few minutes on 2 cores)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## every test, the slow end-to-end ones included
	$(PY) -m pytest -q -m ""

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check $(wildcard pipeline tests bench)

clean-stages:  ## remove the stage outputs of PROFILE (runs/<PROFILE>)
	rm -rf $(RUN)

clean:  ## remove all run outputs, caches and the virtual environment
	rm -rf runs wandb .pytest_cache .ruff_cache $(VENV) *.egg-info
