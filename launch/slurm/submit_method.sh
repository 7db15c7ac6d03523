#!/usr/bin/env bash
# Submit the whole method as four SLURM jobs and print their ids:
#
#   A-Chat (train.sbatch) ──┐
#                           ├─ afterok ─> transplant ─ afterok ─> evaluate
#   A-Raw  (train.sbatch) ──┘
#
# A-Chat and A-Raw start from the same base and share nothing, so they run at the same time on
# separate allocations; the transplant needs both. --kill-on-invalid-dep=yes cancels the
# dependents when a phase fails, instead of leaving them pending forever.
#
# Resources: each training job takes train.sbatch's #SBATCH lines (2 nodes × 8 GPUs there;
# override with SBATCH_ARGS="--nodes=4"), so the two phases hold 2× that at once.
# Batch arithmetic per phase: global_batch = micro × accum × (world / pipeline_stages).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"
HERE="$REPO/launch/slurm"

usage() {
  cat <<'EOF'
usage: launch/slurm/submit_method.sh [--dry-run] [CHAT_CONFIG RAW_CONFIG [OUT]]

Submits A-Chat and A-Raw training concurrently, then transplant (after both succeed) and
evaluate (after the transplant). Prints the four job ids.

arguments / environment:
  CHAT_CONFIG   run config of the chat phase (phase: chat)
  RAW_CONFIG    run config of the raw phase (phase: raw)
  OUT           where everything goes (default: runs/method):
                  OUT/a-chat  OUT/a-raw  (training runs, passed as --out=...)
                  OUT/transplant         (the merged HF model)
  SBATCH_ARGS   extra sbatch flags for the two training jobs, e.g. "--nodes=4 -p gpu"
  EVAL_ARGS     extra flags for pipeline.evaluate
  DRY_RUN=1     same as --dry-run: print the sbatch commands with placeholder job ids

examples:
  launch/slurm/submit_method.sh chat.yaml raw.yaml runs/exp1
  SBATCH_ARGS="--nodes=4" launch/slurm/submit_method.sh --dry-run chat.yaml raw.yaml
EOF
}


DRY_RUN="${DRY_RUN:-0}"
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dry-run) DRY_RUN=1; shift ;;
esac
CHAT_CONFIG="${1:-${CHAT_CONFIG:-}}"
RAW_CONFIG="${2:-${RAW_CONFIG:-}}"
OUT="${3:-${OUT:-runs/method}}"
[ -n "$CHAT_CONFIG" ] && [ -n "$RAW_CONFIG" ] || { usage >&2; exit 2; }
# Jobs run from the repo (sbatch's working directory = where it was called), so give them
# absolute paths (your file, else the shipped config of that name) and tell them where the repo is.
CHAT_CONFIG="$(resolve_config "$CHAT_CONFIG")" || die "CHAT_CONFIG: see above"
RAW_CONFIG="$(resolve_config "$RAW_CONFIG")" || die "RAW_CONFIG: see above"
OUT="$(realpath -m "$OUT")"
export REPO
cd "$REPO"

# shellcheck disable=SC2206  # word splitting of the *_ARGS variables is the point
sbatch_args=(${SBATCH_ARGS:-})
# shellcheck disable=SC2206
eval_args=(${EVAL_ARGS:-})
# --parsable prints "ID" or "ID;CLUSTER"; dependencies want the ID.
submit() {
  if [ "$DRY_RUN" = 1 ]; then
    { printf 'sbatch'; printf ' %q' "${@:2}"; printf '\n'; } >&3
    echo "$1"
  else
    local id; id=$(sbatch "${@:2}"); echo "${id%%;*}"
  fi
}
# In a dry run the first argument is the placeholder echoed instead of a real id; the command
# is printed to fd 3 (our stdout) so that $(...) captures only the id.
exec 3>&1
chat=$(submit CHAT_JOB_ID --parsable --job-name=la-chat "${sbatch_args[@]}" \
       "$HERE/train.sbatch" "$CHAT_CONFIG" --out="$OUT/a-chat")
raw=$(submit RAW_JOB_ID --parsable --job-name=la-raw "${sbatch_args[@]}" \
      "$HERE/train.sbatch" "$RAW_CONFIG" --out="$OUT/a-raw")
transplant=$(submit TRANSPLANT_JOB_ID --parsable --job-name=la-transplant \
             --dependency="afterok:$chat:$raw" --kill-on-invalid-dep=yes \
             "$HERE/transplant.sbatch" "$OUT/a-raw" "$OUT/a-chat" "$OUT/transplant")
evaluate=$(submit EVAL_JOB_ID --parsable --job-name=la-eval \
           --dependency="afterok:$transplant" --kill-on-invalid-dep=yes \
           "$HERE/evaluate.sbatch" "$OUT/transplant" "${eval_args[@]}")

echo "chat=$chat raw=$raw transplant=$transplant evaluate=$evaluate"
echo "watch: squeue -j $chat,$raw,$transplant,$evaluate    outputs: $OUT"
