#!/usr/bin/env bash
# Start `python -m pipeline.train CONFIG` on N ranks with mpirun instead of the deepspeed launcher
# (no ssh/pdsh needed where MPI is already set up). Ranks learn RANK/WORLD_SIZE/LOCAL_RANK from
# Open MPI's variables and agree on MASTER_ADDR/PORT through mpi4py (pipeline/training/dist.py).
#
# Batch arithmetic: world = NP; data_parallel = NP / pipeline_stages;
#   global_batch = micro_batch_size × grad_accum × data_parallel  (grad_accum is derived).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

usage() {
  cat <<'EOF'
usage: launch/mpirun.sh [--dry-run] CONFIG.yaml [--key=value ...]

Runs: mpirun -np NP --map-by slot [--allow-run-as-root] [--hostfile H] -x VAR... \
        python -u -m pipeline.train CONFIG.yaml [--key=value ...]

environment (all optional):
  NP            number of ranks (default: sum of HOSTFILE slots, else NUM_GPUS, else 1)
  NUM_GPUS      ranks on this node when there is no HOSTFILE
  HOSTFILE      `host slots=N` lines (Open MPI reads the same format as DeepSpeed)
  MASTER_ADDR, MASTER_PORT   rendezvous; default: rank 0 picks and broadcasts via mpi4py
  MPIRUN        the mpirun to use (default: the one next to PY, else on PATH)
  MPIRUN_ARGS   extra mpirun arguments, word-split (e.g. "--mca btl tcp,self")
  ENTRY         python module to start (default: pipeline.train)
  PY            python of the environment (default: REPO/.venv/bin/python if present)
  DRY_RUN=1     same as --dry-run: print the command, start nothing

why the flags:
  --map-by slot        fills each host's slots in order, so ranks 0..k-1 share a node and
                       LOCAL_RANK matches OMPI_COMM_WORLD_LOCAL_RANK (DeepSpeed asserts that);
                       Open MPI 5 otherwise maps by package at more than 2 ranks.
  :OVERSUBSCRIBE       added only without HOSTFILE when NP exceeds this machine's cores
                       (CPU testing); on a cluster, too few slots should stay an error.
  --allow-run-as-root  added only when running as root (containers); Open MPI refuses otherwise.

examples:
  NP=4 DS_ACCELERATOR=cpu launch/mpirun.sh demo/raw.yaml --pipeline_stages=2
  HOSTFILE=hosts.txt launch/mpirun.sh chat.yaml --steps=1000
  launch/mpirun.sh --dry-run chat.yaml
EOF
}

parse_launch_args launch/mpirun.sh "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}

find_python
MPIRUN="${MPIRUN:-$(dirname "$(command -v "$PY")")/mpirun}"
[ -x "$MPIRUN" ] || MPIRUN=mpirun
ENTRY="${ENTRY:-pipeline.train}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

mapping=slot
cmd=("$MPIRUN")
if [ -n "${HOSTFILE:-}" ]; then
  hosts=$("$PY" -m pipeline.training.dist check-hostfile "$HOSTFILE")
  NP="${NP:-$(awk '{s += $2} END {print s}' <<<"$hosts")}"
  cmd+=(--hostfile "$HOSTFILE")
else
  NP="${NP:-${NUM_GPUS:-1}}"
  if [ "$NP" -gt "$(nproc 2>/dev/null || echo 1)" ]; then mapping=slot:OVERSUBSCRIBE; fi
fi
cmd+=(-np "$NP" --map-by "$mapping")
[ "$(id -u)" != 0 ] || cmd+=(--allow-run-as-root)
# Ranks on other hosts get only the variables named with -x.
for var in PYTHONPATH MASTER_ADDR MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS \
           TORCH_EXTENSIONS_DIR TOKENIZERS_PARALLELISM HF_HUB_OFFLINE MPLBACKEND; do
  [ -z "${!var:-}" ] || cmd+=(-x "$var")
done
# shellcheck disable=SC2206  # word splitting of MPIRUN_ARGS is the point
[ -z "${MPIRUN_ARGS:-}" ] || cmd+=($MPIRUN_ARGS)
cmd+=("$PY" -u -m "$ENTRY" "$CONFIG" "$@")

if [ "$DRY_RUN" = 1 ]; then
  printf 'PYTHONPATH=%q' "$PYTHONPATH"; printf ' %q' "${cmd[@]}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
