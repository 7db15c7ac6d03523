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
