# The method step by step: data -> chat + raw -> transplant -> eval. Included by the Makefile,
# which defines PY (the venv's python) and `setup`. Each target is one command you could type;
# `make -n TARGET` prints it. Outputs chain through the *_RUN / *_OUT defaults below, so
# `make data chat raw transplant eval TOKENIZER=...` runs the whole method on this machine.

# ---- data: raw corpus and chat conversations -> token shards --------------------------------
# Tokenizer of the base model: the shards store token ids, so it must be the model's own.
TOKENIZER ?=
# Raw text to teach (files or directories of .txt, .jsonl, .parquet, or `datasets` dirs).
RAW_INPUT ?= data/raw
# Chat conversations (OpenAI `messages` or ShareGPT JSONL) that keep the chat format alive.
CHAT_INPUT ?= data/chat.jsonl
# Shard prefix directory: DATA_OUT/raw.manifest.json and DATA_OUT/chat.manifest.json are what
# the run configs' `data:` key points at.
DATA_OUT ?= data/shards
# Extra data_prep flags, e.g. --workers 8 (parallel tokenization) or --skip-bad.
DATA_ARGS ?=

data: setup  ## pack RAW_INPUT and CHAT_INPUT into token shards under DATA_OUT
	@test -n "$(TOKENIZER)" || { echo "error: make data needs TOKENIZER=DIR (the base model's tokenizer)" >&2; exit 2; }
	$(PY) -m data_prep raw $(RAW_INPUT) --tokenizer $(TOKENIZER) --output-prefix $(DATA_OUT)/raw $(DATA_ARGS)
	$(PY) -m data_prep chat $(CHAT_INPUT) --tokenizer $(TOKENIZER) --output-prefix $(DATA_OUT)/chat $(DATA_ARGS)

# ---- chat / raw: the two training phases (independent: run them at the same time if you can)
# Run configs of the two phases (`phase: chat` / `phase: raw`, same model and boundaries): the
# shipped templates for your own model (models/base, data/shards/*). Copy and edit them, or
# override keys with TRAIN_ARGS; the demo's own configs are demo/*.yaml. A name that is not a file
# here is a shipped config (pipeline/configs/), as pipeline.train reads it.
CHAT_CONFIG ?= chat.yaml
RAW_CONFIG ?= raw.yaml
# Where each phase writes its run (passed as --out=..., so the transplant finds them).
CHAT_RUN ?= runs/chat
RAW_RUN ?= runs/raw
# Ranks per node: GPUs per node, or CPU ranks. Empty = every GPU nvidia-smi sees, else 1.
NUM_GPUS ?=
# Multi-node: a `host slots=N` file (empty = this machine only). See launch/run.sh --help.
HOSTFILE ?=
# launch/run.sh (deepspeed launcher) or launch/mpirun.sh (Open MPI; no ssh/pdsh needed).
LAUNCH ?= launch/run.sh
# Config overrides for both phases, e.g. --steps=200 --pipeline_stages=2.
TRAIN_ARGS ?=

chat: setup  ## train A-Chat (format group on chat data) from CHAT_CONFIG into CHAT_RUN
	NUM_GPUS=$(NUM_GPUS) HOSTFILE=$(HOSTFILE) $(LAUNCH) $(CHAT_CONFIG) --out=$(CHAT_RUN) $(TRAIN_ARGS)

raw: setup  ## train A-Raw (raw group on raw text) from RAW_CONFIG into RAW_RUN
	NUM_GPUS=$(NUM_GPUS) HOSTFILE=$(HOSTFILE) $(LAUNCH) $(RAW_CONFIG) --out=$(RAW_RUN) $(TRAIN_ARGS)

# ---- transplant: A-Raw below format_start + A-Chat's format group -> an HF model ------------
# The merged Hugging Face model directory (must be empty or absent; add --force to replace).
TRANSPLANT_OUT ?= runs/transplant
# Extra flags, e.g. --raw-step 500 (default: each run's latest complete checkpoint) or --force.
TRANSPLANT_ARGS ?=

transplant: setup  ## merge RAW_RUN and CHAT_RUN into the HF model TRANSPLANT_OUT
	$(PY) -m pipeline.transplant --raw $(RAW_RUN) --chat $(CHAT_RUN) --out $(TRANSPLANT_OUT) $(TRANSPLANT_ARGS)

# ---- eval: does the model keep the chat format and know the new facts? ----------------------
# The HF model to evaluate (default: the transplant; point it at an export to compare).
EVAL_MODEL ?= $(TRANSPLANT_OUT)
# Results file; evaluating several models into one file builds the comparison table.
EVAL_OUT ?= runs/eval/results.json
# What to measure: --chat-eval FILE (format adherence), --probe FILE (knowledge), --raw-eval FILE.
EVAL_ARGS ?=

eval: setup  ## evaluate EVAL_MODEL (format adherence + knowledge) into EVAL_OUT
	$(PY) -m pipeline.evaluate --model $(EVAL_MODEL) --out $(EVAL_OUT) $(EVAL_ARGS)
