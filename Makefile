# layer-aware: every target sets itself up (the venv) first, so a fresh clone needs only `make demo`
# or `make test`. Every option below is a `?=` default you can override on the command line,
# e.g. `make chat CHAT_CONFIG=my_chat.yaml`.

# The Python that builds the venv: 3.11+ (transformers 5.24+ needs it; CONSTRAINTS was made on 3.11).
PYTHON ?= python3
# torch is installed first and on its own: a bare `torch` requirement would pull a multi-GB CUDA
# build; 2.13.0 is the CPU build that lies on disk here. On a GPU cluster: TORCH='torch==2.13.0'
# with your CUDA index, or TORCH=skip to keep the torch you have (2.13+, pyproject's floor, or pip
# replaces it).
TORCH ?= torch==2.13.0
# The exact versions of everything else that the suite last passed with (pip constraints: they pin
# what gets installed, they install nothing). pyproject.toml only gives the ranges that work; the
# newest release inside a range is untested until someone runs the suite on it, so setup and CI
# install the tested set. CONSTRAINTS= (empty) resolves freely from pyproject's ranges instead:
# `make setup CONSTRAINTS= VENV=.venv-new`. Written by `make lock`.
CONSTRAINTS ?= constraints.txt
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed picks its accelerator at import; without a GPU it must be told, or it guesses CUDA.
# Default: cuda where nvidia-smi answers, cpu elsewhere.
DS_ACCELERATOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
# DeepSpeed JIT-builds a small op on its first start; caching it in the repo makes every later
# start (each test, each demo phase) skip the ~30 s build.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR
# Tokenizers spawn their own thread pool; on 2 cores that fights the data loader and DeepSpeed.
export TOKENIZERS_PARALLELISM ?= false
# Fix intra-op threads: 2 cores shared by 1-4 ranks; oversubscription makes CPU runs crawl.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
# The venv first on PATH: its ninja builds DeepSpeed's op; a second ninja (the system's) would
# discard the first one's build log and force a rebuild on every start.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MPLBACKEND := Agg

.PHONY: setup lock lint test test-fast demo sweep bench bench-gpu data chat raw transplant eval clean help

help:  ## list targets
	@grep -hE '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:[^#]*## /\t/' | column -t -s '	'

# The stamp depends on the constraints too: a new lock reinstalls, so the venv is what it says.
$(VENV)/.stamp: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	if [ "$(TORCH)" != skip ]; then $(VENV)/bin/pip install -q "$(TORCH)"; fi
	$(VENV)/bin/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	touch $@

setup: $(VENV)/.stamp  ## create .venv and install the project with its test extras (pinned by CONSTRAINTS)

# Rewrites CONSTRAINTS from the venv as it is now, so the lock only ever holds a combination the
# suite passed with: upgrade in the venv (`.venv/bin/pip install -U transformers`), `make test`,
# then `make lock` and commit both. Left out: the project itself (the checkout, installed
# editable) and torch with its CUDA runtime (nvidia-*, triton), which TORCH installs: CPU in CI,
# the cluster's CUDA build elsewhere. No `setup` prerequisite: it freezes the venv you tested, not
# a reinstall of the old lock. A tool you pip-installed there by hand (ruff, ipython) lands in the
# lock too: harmless, a constraint installs nothing, but take its line out.
lock:  ## rewrite constraints.txt from the venv's versions (after `make test` passed on them)
	@test -n "$(CONSTRAINTS)" || { echo "error: make lock needs CONSTRAINTS=FILE to write" >&2; exit 2; }
	@test -x $(PY) || { echo "error: no venv at $(VENV): make setup (and make test) first" >&2; exit 1; }
	{ echo "# Exact versions the suite passed with, on Python $$($(PY) -c 'import sys; print(*sys.version_info[:2], sep=".")'). Written by \`make lock\` from"; \
	  echo "# \`pip freeze\`; \`make setup\` installs through it (pip -c). torch: TORCH in the Makefile."; \
	  $(VENV)/bin/pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[a-z0-9_-]+)=='; } > $(CONSTRAINTS).tmp
	@# sh has no pipefail: a freeze that failed leaves no pin, and must not replace the lock.
	grep -q '==' $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

PYTEST_ARGS ?=
# pytest exits 5 when it collected no test: that is a broken suite (a bad path or a lost
# conftest), not a pass, so it fails with a message instead of passing quietly.
# ruff first: a lint or format slip fails in a second, before a quarter hour of tests.
lint: setup  ## ruff lint and format check ([tool.ruff] in pyproject.toml)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint  ## lint, then the test suite (CPU, real DeepSpeed multi-process runs included)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (PYTEST_ARGS='$(PYTEST_ARGS)')" >&2; exit 1; fi; \
	exit $$rc

# Everything that starts no other process (no DeepSpeed rank, training, mergekit or CLI run):
# configs, data prep in-process, the loss, the merge arithmetic, bad inputs. Minutes, not a
# quarter hour: the lane to run while editing. CI runs `make test`, which keeps every test.
test-fast: setup  ## the tests that start no other process (a few minutes on 2 cores)
	@$(PY) -m pytest -m "not multiproc" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (PYTEST_ARGS='$(PYTEST_ARGS)')" >&2; exit 1; fi; \
	exit $$rc

# ---- the main job ---------------------------------------------------------------------------
# Where the demo writes everything (world, shards, runs, models, results). Reruns continue, and a
# sweep in the same folder reuses the demo's base and A-Chat. Each seed gets its own folder
# (runs/demo, runs/demo-seed1, ...): the demo refuses a folder made with other settings rather than
# reuse its runs.
# SEEDS=0,1,2,3,4 (or 0-4) runs each seed in DEMO_OUT/seed-S and writes DEMO_OUT/aggregate.md: means
# with 95% intervals over seeds, because one seed's figures move by 10-15 points.
SEEDS ?=
DEMO_OUT ?= $(if $(SEEDS),runs/demo-seeds,runs/demo$(if $(filter-out 0,$(SEED)),-seed$(SEED)))
# DEMO_SIZE=tiny is a few-minute plumbing check with meaningless numbers.
DEMO_SIZE ?= full
# One seed sets the world, the initialisation and the data order.
SEED ?= 0
# Another world than the default, as KEY=VALUE,... of build_world (pipeline/demo/world.py), e.g.
# WORLD=names=syllables; give it its own DEMO_OUT.
WORLD ?=
# The recipe the demo runs beside the baselines (the best the sweep found).
RECIPE ?= demo/recipe.yaml
# The recipes and world variants `make sweep` measures.
SWEEP ?= demo/sweep.yaml

demo: setup  ## the whole method on the built-in synthetic world, on CPU (~14 min): table in $(DEMO_OUT)/results.md
	$(PY) -m pipeline.demo --out $(DEMO_OUT) --size $(DEMO_SIZE) $(if $(SEEDS),--seeds $(SEEDS),--seed $(SEED)) $(if $(WORLD),--world $(WORLD)) --recipe $(RECIPE)

sweep: setup  ## every recipe of SWEEP against the demo's base and A-Chat (hours on CPU): $(DEMO_OUT)/sweep.md
	$(PY) -m pipeline.demo --out $(DEMO_OUT) --size $(DEMO_SIZE) $(if $(SEEDS),--seeds $(SEEDS),--seed $(SEED)) --sweep $(SWEEP)

# ---- benchmarks -------------------------------------------------------------------------------
# small keeps a CPU run under 10 minutes; medium uses bigger models for steadier ratios.
BENCH_SIZE ?= small

bench: setup  ## speed and memory against plain baselines -> runs/bench/latest.{json,md}
	$(PY) -m bench.run --size $(BENCH_SIZE)

# On a GPU machine: ~1.1B Llama, bf16, pipeline vs plain PyTorch, tokens/s and MFU (~3 min on an H100).
bench-gpu: setup  ## GPU tokens/s and MFU -> bench/results/gpu.{json,md}
	DS_ACCELERATOR=cuda $(PY) -m bench.gpu

include launch/Makefile.targets.mk

clean:  ## remove the venv, caches and runs/ (your data and configs stay)
	rm -rf $(VENV) .cache runs .pytest_cache
