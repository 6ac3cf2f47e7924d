#!/bin/bash
# Progressive-scaling step between two stages: grow the finished stage's parameter tokens to the next
# stage's counts and write its weights for the next stage's TP degree (tools/expand_tokens.py, one CPU task).
# Submitted by slurm/progressive.sh with --dependency=afterok:<previous stage>; the next stage depends on it.
#   SRC_RUN=runs/owt_124m OUT=runs/owt_354m.init TARGET=configs/owt_354m.yaml sbatch slurm/expand.sh
# Env: SRC_RUN (run dir; its latest checkpoint is used), OUT (must not exist, or is reused as finished),
#      TARGET (next stage's config), TP (default: TARGET's parallel.tp), REPO, PYTHON.
# Extra arguments go to tools/expand_tokens.py (e.g. --init official).
#SBATCH --job-name=tf-expand
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
die() { echo "slurm: error: $*" >&2; exit 2; }

REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$REPO/tools/expand_tokens.py" ]] || die "REPO=$REPO has no tools/expand_tokens.py; submit from the repository root"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable; set PYTHON to the project's python"
[[ -f "$SRC_RUN/checkpoints/latest" ]] || die "SRC_RUN=${SRC_RUN:-}: no checkpoints/latest (did the stage finish?)"
[[ -f "${TARGET:-}" ]] || die "TARGET=${TARGET:-}: no such config file (the next stage's configs/*.yaml)"
[[ -n "${OUT:-}" ]] || die "OUT is empty; set it to the directory the expanded weights go to"
if [[ -e "$OUT" ]]; then  # expand_tokens.py renames its output into place only when complete
  echo "slurm: $OUT already exists (an earlier run of this job finished it); nothing to do"
  exit 0
fi
if [[ -z "${TP:-}" ]]; then
  TP="$("$PYTHON" -c 'import sys; from tokenformer_dist.config import load_config
print(load_config(sys.argv[1]).parallel.tp)' "$TARGET")"
fi
mkdir -p "$(dirname "$OUT")"
echo "slurm: expanding $SRC_RUN/checkpoints/$(cat "$SRC_RUN/checkpoints/latest") -> $OUT (tp $TP, $TARGET)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
exec "$PYTHON" tools/expand_tokens.py --ckpt "$SRC_RUN" --out "$OUT" --tp "$TP" --config "$TARGET" "$@"
