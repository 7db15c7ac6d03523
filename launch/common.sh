# Shared by the launch scripts (sourced, not run): error exit and the choice of Python.
# (The sbatch scripts keep their own copies: SLURM runs a spooled copy of the script, from
# which a relative `source` cannot find this file before REPO is known.)

die() { echo "error: $*" >&2; exit 2; }

# PY: the caller's choice, else the repo's venv, else python3. The launchers next to it
# (deepspeed, mpirun) are taken from the same bin/, so every rank runs in that environment.
find_python() {
  if [ -z "${PY:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
  fi
}

# The launchers' shared command line: [--dry-run | -h] CONFIG [--key=value ...].
# Sets DRY_RUN (also from the environment), CONFIG, and ARGS (the overrides, passed through);
# calls the script's own usage(). $1 is the script's name, for the error message.
parse_launch_args() {
  local me="$1"; shift
  DRY_RUN="${DRY_RUN:-0}"
  case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
  esac
  [ $# -ge 1 ] || { usage >&2; exit 2; }
  CONFIG="$1"; shift
  # As pipeline.train finds it (one rule, pipeline/shipped.py): your file, else a shipped config
  # of that name (chat.yaml, demo/raw.yaml). Its error names where it looked; exit 2.
  CONFIG="$(resolve_config "$CONFIG")" || { echo "  (the config is the first argument of $me)" >&2; exit 2; }
  ARGS=("$@")
}

# The absolute path of a run config, as pipeline.train resolves it; exit 2 when there is none.
resolve_config() {
  find_python
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pipeline.shipped "$1"
}
