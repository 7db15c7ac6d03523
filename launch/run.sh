#!/usr/bin/env bash
# Start `python -m pipeline.train CONFIG` on one node or many, through the deepspeed launcher.
# Run with --help for the options. Every setting comes from the environment, so the same line
# works from a shell, a Makefile or a job script.
#
# Batch arithmetic (the run config holds these numbers; the launcher only sets the world):
#   world         = nodes × NUM_GPUS                  (ranks; one per GPU)
#   data_parallel = world / pipeline_stages           (must divide evenly)
#   global_batch  = micro_batch_size × grad_accum × data_parallel
# global_batch_size is fixed in the config and grad_accum is derived, so a run trains the same
# way on 1 GPU or 64: only the time per step changes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

usage() {
  cat <<'EOF'
usage: launch/run.sh [--dry-run] CONFIG.yaml [--key=value ...]

Starts `python -m pipeline.train CONFIG.yaml [--key=value ...]` on every rank through the
`deepspeed` launcher. Arguments after CONFIG override config keys and reach pipeline.train
untouched.

environment (all optional):
  HOSTFILE      DeepSpeed hostfile, lines `host slots=N`; unset = this node only.
                Multi-node needs passwordless ssh and pdsh (or LAUNCHER=openmpi).
  NUM_NODES     use the first N hosts of HOSTFILE (default: all of them)
  NUM_GPUS      ranks per node: GPUs per node, or CPU ranks with DS_ACCELERATOR=cpu
                (default: `nvidia-smi -L` count, else 1; with HOSTFILE: its slots)
  MASTER_ADDR   address of rank 0 (default: 127.0.0.1 on one node; first host otherwise)
  MASTER_PORT   rendezvous port (default: 29500); two jobs on one node need two ports
  LAUNCHER      deepspeed multi-node backend: pdsh (default), openmpi, mpich, slurm, ...
  ENTRY         python module to start (default: pipeline.train)
  PY            python of the environment (default: REPO/.venv/bin/python if present)
  DRY_RUN=1     same as --dry-run: print the command, start nothing

examples:
  launch/run.sh chat.yaml                             # one process per GPU here
  NUM_GPUS=4 DS_ACCELERATOR=cpu launch/run.sh demo/raw.yaml --pipeline_stages=2 --steps=20
  HOSTFILE=hosts.txt NUM_GPUS=8 launch/run.sh chat.yaml
  launch/run.sh --dry-run chat.yaml                   # show, don't run
On SLURM use launch/slurm/train.sbatch; with mpirun use launch/mpirun.sh.
EOF
}

parse_launch_args launch/run.sh "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}

find_python
# The launcher that belongs to that python, so the ranks run in the same environment.
DEEPSPEED="${DEEPSPEED:-$(dirname "$(command -v "$PY")")/deepspeed}"
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed
ENTRY="${ENTRY:-pipeline.train}"
MASTER_PORT="${MASTER_PORT:-29500}"
# Ranks import `pipeline` from this checkout whatever their working directory; the deepspeed
# launcher forwards PYTHONPATH to other nodes.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

cmd=("$DEEPSPEED")
if [ -n "${HOSTFILE:-}" ]; then
  # Parse it ourselves first: a bad line is reported as FILE:LINE before anything starts.
  "$PY" -m pipeline.training.dist check-hostfile "$HOSTFILE" >/dev/null
  cmd+=(--hostfile "$HOSTFILE")
  [ -z "${NUM_NODES:-}" ] || cmd+=(--num_nodes "$NUM_NODES")
  [ -z "${NUM_GPUS:-}" ] || cmd+=(--num_gpus "$NUM_GPUS")
  [ -z "${MASTER_ADDR:-}" ] || cmd+=(--master_addr "$MASTER_ADDR")
  [ -z "${LAUNCHER:-}" ] || cmd+=(--launcher "$LAUNCHER")
else
  if [ "${NUM_NODES:-1}" != 1 ]; then
    die "NUM_NODES=$NUM_NODES needs HOSTFILE (which hosts?); see launch/run.sh --help"
  fi
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NUM_GPUS:-0}" -gt 0 ] || NUM_GPUS=1
  fi
  cmd+=(--num_gpus "$NUM_GPUS")
fi
# --no_local_rank: ranks read LOCAL_RANK from the environment; no extra --local_rank argument
# lands in front of the config path.
cmd+=(--master_port "$MASTER_PORT" --no_local_rank --module "$ENTRY" "$CONFIG" "$@")

if [ "$DRY_RUN" = 1 ]; then
  printf 'PYTHONPATH=%q' "$PYTHONPATH"; printf ' %q' "${cmd[@]}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
