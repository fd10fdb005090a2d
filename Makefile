# The pipeline as a DAG of file targets: each stage's finished output (its summary.json, written last and
# moved into place atomically) is the target, so `make sft` builds pretrain first and does nothing the
# second time. Edit the profile YAML or the data and the affected stages rebuild.
#
#   make sft rm ppo                      the whole pipeline on the default tiny profile (CPU, minutes)
#   make sft PROFILE=gpt2                another profile (configs/<PROFILE>.yaml)
#   make sft ARGS="sft.lr=3e-4"          config overrides (a changed value rebuilds the stages it affects)
#   make sft LAUNCH="accelerate launch --config_file configs/accelerate/ddp.yaml -m"   N GPUs
#   make ppo LAUNCH="accelerate launch --config_file configs/accelerate/zero3.yaml -m" DeepSpeed ZeRO-3
#   make label rm ARGS="rm.data.train=runs/tiny/label/rankings.jsonl"   an RM on the policy's own samples
#   make dry-run STAGE=sft               check sft's config and data, show one example as the model sees it
#   make sft ARGS=--dry-run              the same: with --dry-run in ARGS the stage targets only dry-run

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
.PHONY: FORCE help install bench pretrain sft rm ppo label label-serve dry-run iterate oracle ptx-ablation summary report env test test-all lint clean clean-stages

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE)  ARGS=\"...\"  LAUNCH=\"$(LAUNCH)\""
	@echo "  a stage's keys (type, bounds, help, value): $(PY) -m pipeline <stage> --help --config $(CONFIG)$(if $(ARGS), $(ARGS))"

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pipeline.distributed  # compile DeepSpeed's CPU ops once (~1 min), not inside the first launch
	touch $@

install: $(STAMP)  ## create .venv and install torch, DeepSpeed + the pipeline (done automatically by every target)

ifeq ($(filter --dry-run,$(ARGS)),)
pretrain: $(RUN)/pretrain/summary.json  ## stage 1: continued pretraining on the corpus
sft: $(RUN)/sft/summary.json            ## stage 2: supervised fine-tuning on demonstrations (builds pretrain)
rm: $(RUN)/rm/summary.json              ## stage 3: reward model on ranked completions (builds sft)
ppo: $(RUN)/ppo/summary.json            ## stage 4: PPO-ptx against the reward model (builds sft and rm)
else
# ARGS=--dry-run: the stage targets dry-run only the named stage, without building the stages before it and
# without the config stamps, so nothing is written under runs/.
pretrain sft rm ppo: $(STAMP)
	$(PY) -m pipeline $@ --config $(CONFIG) $(ARGS)
endif
label: $(RUN)/label/summary.json        ## rank the policy's samples: to_label.jsonl (+ rankings.jsonl by the gold labeler)

# Dry run: validate the config and every data source of STAGE (all four stages by default), print counts and
# one example exactly as the model sees it; trains nothing, writes nothing under runs/ (no stamps either).
STAGE ?= pretrain sft rm ppo
dry-run: $(STAMP)  ## check config + data of STAGE=<stage> (default: all) and show what the model sees; writes nothing
	@for s in $(STAGE); do $(PY) -m pipeline $$s --dry-run --config $(CONFIG) $(ARGS) || exit $$?; done

# Per-stage stamps: rewritten only when that stage's part of the resolved config (profile + ARGS) or its
# data files change, so a new sft.lr rebuilds sft but not pretrain.
$(RUN)/.stamps/%.json: FORCE $(STAMP)
	@$(PY) -m pipeline stamp --config $(CONFIG) $(ARGS)

$(RUN)/pretrain/summary.json: $(RUN)/.stamps/pretrain.json pipeline/stages/pretrain.py
	$(LAUNCH) pipeline pretrain --config $(CONFIG) $(ARGS)

$(RUN)/sft/summary.json: $(RUN)/pretrain/summary.json $(RUN)/.stamps/sft.json pipeline/stages/sft.py
	$(LAUNCH) pipeline sft --config $(CONFIG) $(ARGS)

$(RUN)/rm/summary.json: $(RUN)/sft/summary.json $(RUN)/.stamps/rm.json pipeline/stages/rm.py pipeline/ranking.py
	$(LAUNCH) pipeline rm --config $(CONFIG) $(ARGS)

$(RUN)/ppo/summary.json: $(RUN)/sft/summary.json $(RUN)/rm/summary.json $(RUN)/.stamps/ppo.json pipeline/stages/ppo.py pipeline/rollout.py
	$(LAUNCH) pipeline ppo --config $(CONFIG) $(ARGS)

# The label stage samples label.policy: sft (default) or ppo, this profile's stage (built first), or a directory,
# which is a prerequisite when it exists as make starts (or is another rule's target, e.g. a round's ppo).
LABEL_POLICY := $(or $(patsubst label.policy=%,%,$(lastword $(filter label.policy=%,$(ARGS)))),sft)
LABEL_POLICY_DEP := $(if $(filter sft ppo,$(LABEL_POLICY)),$(RUN)/$(LABEL_POLICY)/summary.json,$(wildcard $(LABEL_POLICY)/summary.json))
$(RUN)/label/summary.json: $(LABEL_POLICY_DEP) $(RUN)/.stamps/label.json pipeline/stages/label.py pipeline/labeling.py
	$(LAUNCH) pipeline label --config $(CONFIG) $(ARGS)

# The labeling page for people (label.labeler=human): http://127.0.0.1:$(PORT)/, appending to
# runs/<PROFILE>/label/rankings.jsonl. Ctrl-C stops it; every submitted ranking is already on disk.
PORT ?= 8765
label-serve: $(RUN)/label/summary.json  ## serve the labeling page for people (ARGS="label.labeler=human", PORT=8765)
	$(PY) -m pipeline label --serve --port $(PORT) --config $(CONFIG) $(ARGS)

# The ptx ablation: the same PPO run with the pretraining term off (ppo.ptx_coef=0), from the same SFT
# policy and reward model, same seed; then both runs' final metrics side by side.
ABLATION := $(RUN)/ablation-ptx0
$(ABLATION)/ppo/summary.json: $(RUN)/ppo/summary.json
	$(LAUNCH) pipeline ppo --config $(CONFIG) $(ARGS) run_dir=$(ABLATION) ppo.init=$(RUN)/sft ppo.reward_model=$(RUN)/rm ppo.ptx_coef=0

ptx-ablation: $(ABLATION)/ppo/summary.json  ## PPO-ptx (make ppo) vs plain PPO (ppo.ptx_coef=0): held-out corpus loss and reward
	@$(PY) -m pipeline compare $(RUN)/ppo $(ABLATION)/ppo

# RLHF rounds (InstructGPT's and Anthropic's iterated online RLHF): round 1 is the chain above (rm on the profile's
# rankings, then ppo); round r >= 2 lives in runs/<PROFILE>/round-<r>/: `label` ranks samples of round r-1's
# policy, `rm` is retrained from SFT on the profile's rankings plus every round's labels so far (rm.extra_train),
# `ppo` runs again against it: from round r-1's policy (ROUND_FROM=last, the default: on the tiny task it ends
# higher on held-out gold than a restart, README), or from SFT (ROUND_FROM=sft, InstructGPT), KL-anchored to SFT
# either way. Same DAG: a second `make iterate` does nothing, a killed round resumes, and ARGS apply to every
# round (e.g. ARGS="label.noise=0.27"); a profile's rounds.overrides (configs/tiny.yaml: rm.epochs=6) and ROUND_ARGS
# to rounds 2.. only, in that order, under and over ARGS (e.g. ROUND_ARGS="rm.lr=3e-4").
ROUNDS ?= 2
ROUND_FROM ?= last
ROUND_ARGS ?=
ROUND_LIST := $(shell seq 2 $(ROUNDS) 2>/dev/null)
comma := ,
empty :=
space := $(empty) $(empty)
round_dir = $(RUN)/round-$(1)
round_prev = $(if $(filter 2,$(1)),$(RUN),$(RUN)/round-$(shell expr $(1) - 1))
round_labels = $(subst $(space),$(comma),$(strip $(foreach r,$(shell seq 2 $(1)),$(RUN)/round-$(r)/label/rankings.jsonl)))
round_args = $(ROUND_ARGS) round=$(1) run_dir=$(call round_dir,$(1)) label.policy=$(call round_prev,$(1))/ppo \
	label.reward_model=$(call round_prev,$(1))/rm rm.init=$(RUN)/sft \
	rm.extra_train=[$(call round_labels,$(1))] rm.policy_samples=$(call round_prev,$(1))/ppo \
	ppo.init=$(if $(filter last,$(ROUND_FROM)),$(call round_prev,$(1))/ppo,$(RUN)/sft) ppo.reference=$(RUN)/sft \
	ppo.reward_model=$(call round_dir,$(1))/rm

define ROUND
$(call round_dir,$(1))/.stamps/%.json: FORCE $(STAMP)
	@$(PY) -m pipeline stamp --config $(CONFIG) $(ARGS) $(call round_args,$(1))

$(call round_dir,$(1))/label/summary.json: $(call round_prev,$(1))/ppo/summary.json $(call round_dir,$(1))/.stamps/label.json pipeline/stages/label.py pipeline/labeling.py
	$(LAUNCH) pipeline label --config $(CONFIG) $(ARGS) $(call round_args,$(1))

$(call round_dir,$(1))/rm/summary.json: $(RUN)/sft/summary.json $(call round_dir,$(1))/label/summary.json $(call round_dir,$(1))/.stamps/rm.json pipeline/stages/rm.py pipeline/ranking.py
	$(LAUNCH) pipeline rm --config $(CONFIG) $(ARGS) $(call round_args,$(1))

$(call round_dir,$(1))/ppo/summary.json: $(call round_dir,$(1))/rm/summary.json $(call round_dir,$(1))/.stamps/ppo.json pipeline/stages/ppo.py pipeline/rollout.py
	$(LAUNCH) pipeline ppo --config $(CONFIG) $(ARGS) $(call round_args,$(1))
endef
$(foreach r,$(ROUND_LIST),$(eval $(call ROUND,$(r))))

iterate: $(RUN)/ppo/summary.json $(foreach r,$(ROUND_LIST),$(call round_dir,$(r))/ppo/summary.json)  ## RLHF rounds 1..ROUNDS (default 2): label the last policy's samples, retrain rm, ppo again (ROUND_FROM=last|sft)
	@$(PY) -m pipeline rounds --config $(CONFIG) $(ARGS)

# The ceiling of the rounds: the same PPO (iterations, beta) with the gold reward itself as the reward (tiny task).
ORACLE := $(RUN)/oracle
$(ORACLE)/ppo/summary.json: $(RUN)/ppo/summary.json
	$(LAUNCH) pipeline ppo --config $(CONFIG) $(ARGS) run_dir=$(ORACLE) ppo.init=$(RUN)/sft ppo.reward_model=$(RUN)/rm ppo.reward=gold

oracle: $(ORACLE)/ppo/summary.json  ## PPO on the gold reward itself (tiny task): the gain a perfect reward model allows
	@$(PY) -m pipeline compare $(RUN)/ppo $(ORACLE)/ppo


FORCE:

summary: $(STAMP)  ## print the final metrics of this profile's finished stages
	@$(PY) -m pipeline summary --config $(CONFIG) $(ARGS)

report: $(STAMP)  ## HTML report with plots of the finished stages: runs/<PROFILE>/report/index.html
	@$(PY) -m pipeline report --config $(CONFIG) $(ARGS)

# No install and no config needed: a bug report about a failed install needs it most. Falls back to the
# system python3 when .venv does not exist yet (pipeline/env.py uses only the standard library).
env:  ## versions (Python, torch, transformers, trl, ...), OS, CPUs, GPUs: paste it into a bug report
	@$(if $(wildcard $(PY)),$(PY),python3) -m pipeline.env

# make chat: the profile's PPO policy; CHAT_STAGE=sft (or pretrain) picks another stage, DIR=<path> any finished
# stage directory, CHAT_ARGS="--greedy --temperature 0.7 ..." the sampling options (python -m pipeline chat -h).
CHAT_STAGE ?= ppo
DIR ?= $(RUN)/$(CHAT_STAGE)
CHAT_ARGS ?=
chat: $(STAMP)  ## talk to a finished stage's policy in the terminal (CHAT_STAGE=ppo|sft|pretrain, DIR=..., CHAT_ARGS=...)
	@$(PY) -m pipeline chat $(DIR) $(CHAT_ARGS)

test: $(STAMP)  ## the test suite, including the real tiny pretrain → sft chain (~15 minutes on 2 idle cores)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## every test, the slow end-to-end ones included
	$(PY) -m pytest -q -m ""

# The speed comparison (bench/run.py): our PPO, PPO-ptx, SFT and RM stages against plain TRL (1.12, in its own
# venv bench/.peer-venv, created on first use) on this machine, alternating runs; table + runs/bench/bench.json.
BENCH_ARGS ?=
bench: $(STAMP)  ## speed vs TRL 1.12 (PPO, SFT) and RewardTrainer: throughput, peak RSS, ratio (BENCH_ARGS="--quick")
	$(PY) bench/run.py $(BENCH_ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check $(wildcard pipeline tests bench)

clean-stages:  ## remove the stage outputs of PROFILE (runs/<PROFILE>)
	rm -rf $(RUN)

clean:  ## remove all run outputs, caches and the virtual environment
	rm -rf runs wandb .pytest_cache .ruff_cache $(VENV) *.egg-info
