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
  # As pipeline.train finds it: a relative path that is not under the working directory but names
  # a config shipped with the repository (configs/chat.yaml) is taken from the repository.
  if [ ! -e "$CONFIG" ] && [ "${CONFIG#/}" = "$CONFIG" ] && [ -f "$REPO/$CONFIG" ]; then CONFIG="$REPO/$CONFIG"; fi
  [ -e "$CONFIG" ] || die "config $CONFIG not found (first argument of $me; looked in $PWD and $REPO)"
  ARGS=("$@")
}
