#!/bin/bash
# Submit the OWT progressive-scaling ladder 124M -> 354M -> 757M -> 1.4B as one chain of Slurm jobs:
#   stage 124m  ->afterok->  expand  ->afterok->  stage 354m  ->afterok->  expand  -> ... -> stage 1p4b
# Each stage is slurm/pretrain_<stage>.sh with RUN_DIR=$RUN_ROOT/owt_<stage> and, after the first,
# INIT_FROM=$RUN_ROOT/owt_<stage>.init, which the expand job (slurm/expand.sh) writes from the previous
# stage's final checkpoint. A stage that is requeued (time limit, preemption) keeps its job id, so the
# chain simply waits for it. Run from the repository root:   slurm/progressive.sh [trainer args]
#
# Env: RUN_ROOT (default runs/progressive); FROM_STAGE / TO_STAGE (124m|354m|757m|1p4b: first and last
#   stage to submit; FROM_STAGE's previous stage's run dir must hold its final checkpoint); CONFIG_124M / CONFIG_354M / CONFIG_757M /
#   CONFIG_1P4B (defaults configs/owt_<stage>.yaml); DATA; NODES, GPUS_PER_NODE, TASKS_PER_NODE, TIME
#   (become sbatch --nodes/--gpus-per-node/--ntasks-per-node/--time of the stage jobs); SBATCH_ARGS
#   (extra sbatch flags for every job, e.g. "--partition=gpu --account=proj"); EXPAND_SBATCH_ARGS (extra
#   sbatch flags for the expand jobs only, e.g. "--mem=200G"); EXPAND_ARGS (extra tools/expand_tokens.py
#   flags). Trainer arguments given to this script go to every stage.
set -euo pipefail
die() { echo "progressive.sh: error: $*" >&2; exit 2; }

cd "$(dirname "$0")/.."
command -v sbatch >/dev/null || die "sbatch not found; run this on a Slurm login node"
ALL_STAGES=(124m 354m 757m 1p4b)
RUN_ROOT="${RUN_ROOT:-runs/progressive}"
FROM_STAGE="${FROM_STAGE:-124m}"
TO_STAGE="${TO_STAGE:-1p4b}"
start=-1
end=-1
for i in "${!ALL_STAGES[@]}"; do
  [[ "${ALL_STAGES[$i]}" != "$FROM_STAGE" ]] || start=$i
  [[ "${ALL_STAGES[$i]}" != "$TO_STAGE" ]] || end=$i
done
((start >= 0)) || die "FROM_STAGE=$FROM_STAGE; valid: ${ALL_STAGES[*]}"
((end >= start)) || die "TO_STAGE=$TO_STAGE; valid: one of ${ALL_STAGES[*]}, not before FROM_STAGE=$FROM_STAGE"
STAGES=("${ALL_STAGES[@]:start:end - start + 1}")

config_for() {
  local var="CONFIG_${1^^}"
  echo "${!var:-configs/owt_$1.yaml}"
}
for stage in "${STAGES[@]}"; do
  [[ -f "$(config_for "$stage")" ]] || die "CONFIG_${stage^^}=$(config_for "$stage"): no such config file"
done

read -r -a extra <<<"${SBATCH_ARGS:-}"
stage_flags=("${extra[@]}")
[[ -z "${NODES:-}" ]] || stage_flags+=(--nodes="$NODES")
[[ -z "${GPUS_PER_NODE:-}" ]] || stage_flags+=(--gpus-per-node="$GPUS_PER_NODE")
if [[ -n "${TASKS_PER_NODE:-}" ]]; then
  stage_flags+=(--ntasks-per-node="$TASKS_PER_NODE")
elif [[ -n "${GPUS_PER_NODE:-}" ]] && ((GPUS_PER_NODE > 0)); then
  stage_flags+=(--ntasks-per-node="$GPUS_PER_NODE")
fi
[[ -z "${TIME:-}" ]] || stage_flags+=(--time="$TIME")
read -r -a expand_flags <<<"${EXPAND_SBATCH_ARGS:-}"
read -r -a expand_args <<<"${EXPAND_ARGS:-}"

# submit FLAGS... SCRIPT [ARGS...] with the env in `job_env`; prints the job id
submit() {
  local out
  out="$(env "${job_env[@]}" sbatch --parsable "$@")" || die "sbatch $* failed"
  echo "${out%%;*}"
}

prev=""      # job id the next job depends on
prev_run=""  # run dir of the previous stage
if ((start > 0)); then
  prev_run="$RUN_ROOT/owt_${ALL_STAGES[start - 1]}"
  [[ -f "$prev_run/checkpoints/latest" ]] || die "FROM_STAGE=$FROM_STAGE needs a finished $prev_run"
fi
for stage in "${STAGES[@]}"; do
  run="$RUN_ROOT/owt_$stage"
  cfg="$(config_for "$stage")"
  dep=()
  init=""
  if [[ -n "$prev_run" ]]; then
    init="$run.init"
    [[ -z "$prev" ]] || dep=(--dependency="afterok:$prev")
    job_env=(-u TP "SRC_RUN=$prev_run" "OUT=$init" "TARGET=$cfg")
    prev="$(submit "${extra[@]}" "${expand_flags[@]}" "${dep[@]}" slurm/expand.sh "${expand_args[@]}")"
    echo "expand -> $stage: job $prev (${dep[*]:-no dependency}) writes $init"
    dep=(--dependency="afterok:$prev")
  fi
  # TP is unset: each stage takes its own TP from its config
  job_env=(-u TP "CONFIG=$cfg" "RUN_DIR=$run" "INIT_FROM=$init")
  prev="$(submit "${stage_flags[@]}" "${dep[@]}" "slurm/pretrain_$stage.sh" "$@")"
  echo "stage $stage: job $prev (${dep[*]:-no dependency}) trains $cfg in $run"
  prev_run="$run"
done
