# shellcheck shell=bash
# Shared body of slurm/pretrain_*.sh: check the allocation, start one trainer rank per GPU (one per task on
# CPU nodes) with srun, rendezvous on the first node, and requeue the job when its time limit is near (the
# warning's lead is derived from the config: tokenformer_dist/planning/cadence.py). Sourced by a stage script that
# sets the CONFIG and RUN_DIR defaults; see docs/slurm.md.
#
# Environment (all optional; relative paths are relative to REPO):
#   CONFIG RUN_DIR DATA INIT_FROM TP   what to train: config, run dir, dataset, initial weights, TP degree
#   NODES GPUS_PER_NODE TASKS_PER_NODE how many ranks to start; default: what sbatch allocated
#   REPO (default: the submit dir)  PYTHON (default: $REPO/.venv/bin/python)  CPUS_PER_TASK
#   SIGNAL_LEAD (seconds of warning before the time limit; default: derived from the config)
# Arguments after the script name go to the trainer, e.g. `--steps 100 --set train.save_every=50`.

set -euo pipefail

die() { echo "slurm: error: $*" >&2; exit 2; }
log() { echo "slurm[$(date +%H:%M:%S)] $*"; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "submit this script with sbatch (SLURM_JOB_ID is not set)"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$REPO/tokenformer_dist/__init__.py" ]] ||
  die "REPO=$REPO is not a tokenformer-dist checkout; submit from the repository root or set REPO"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || die "PYTHON=$PYTHON is not an executable; set PYTHON to the project's python"
[[ -f "${CONFIG:?}" ]] || die "CONFIG=$CONFIG: no such config file (valid: a YAML file such as configs/tiny.yaml)"
[[ -n "${RUN_DIR:-}" ]] || die "RUN_DIR is empty; set it to the run directory"
[[ -z "${DATA:-}" || -d "$DATA" ]] || die "DATA=$DATA: no such dataset directory (build one with data_prep/build.py)"

# --- ranks: one per GPU; on CPU nodes (GPUS_PER_NODE=0) one per allocated task ---------------------------
NODES="${NODES:-$SLURM_JOB_NUM_NODES}"
alloc_gpus="${SLURM_GPUS_PER_NODE:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${alloc_gpus##*:}}"  # SLURM_GPUS_PER_NODE may read "a100:8"
if [[ -z "${TASKS_PER_NODE:-}" ]]; then
  if is_int "$GPUS_PER_NODE" && ((GPUS_PER_NODE > 0)); then
    TASKS_PER_NODE="$GPUS_PER_NODE"
  else
    TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))}"
  fi
fi
for v in NODES GPUS_PER_NODE TASKS_PER_NODE; do
  is_int "${!v}" || die "$v=${!v} is not a non-negative integer"
done
((NODES >= 1 && NODES <= SLURM_JOB_NUM_NODES)) ||
  die "NODES=$NODES but the job has $SLURM_JOB_NUM_NODES node(s); submit with sbatch --nodes=$NODES"
((TASKS_PER_NODE >= 1)) || die "TASKS_PER_NODE=$TASKS_PER_NODE; valid: >= 1"
if ((GPUS_PER_NODE > 0 && TASKS_PER_NODE != GPUS_PER_NODE)); then
  die "TASKS_PER_NODE=$TASKS_PER_NODE but GPUS_PER_NODE=$GPUS_PER_NODE; the trainer runs one rank per GPU"
fi
WORLD=$((NODES * TASKS_PER_NODE))
((WORLD <= SLURM_NTASKS)) ||
  die "$NODES node(s) x $TASKS_PER_NODE task(s) = $WORLD ranks but the job has $SLURM_NTASKS tasks;" \
    "submit with sbatch --nodes=$NODES --ntasks-per-node=$TASKS_PER_NODE"
if [[ -n "${TP:-}" ]]; then
  if ! is_int "$TP" || ((TP < 1 || WORLD % TP != 0)); then
    die "TP=$TP does not divide the $WORLD ranks; valid: a divisor of it"
  fi
fi
cpus_on_node="${SLURM_CPUS_ON_NODE:-$TASKS_PER_NODE}"
CPUS_PER_TASK="${CPUS_PER_TASK:-$((cpus_on_node / TASKS_PER_NODE > 0 ? cpus_on_node / TASKS_PER_NODE : 1))}"

# --- rendezvous on the first node; the port comes from the job id so two jobs can share a node ----------
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# the address Slurm itself reaches that node at (NodeAddr; it is the node name unless slurm.conf says otherwise)
MASTER_ADDR="$(scontrol show node "$first_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
MASTER_ADDR="${MASTER_ADDR:-$first_node}"
# one rule for the port, below the kernel's ephemeral range (tokenformer_dist/distributed/net.py: job_port)
MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import sys; from tokenformer_dist.distributed.net import job_port
print(job_port(int(sys.argv[1])))' "$SLURM_JOB_ID")}"
export MASTER_ADDR MASTER_PORT
# a RANK/WORLD_SIZE inherited from the submitting shell would override SLURM_PROCID in the trainer
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

# --- NCCL and threads (cluster-specific NCCL_SOCKET_IFNAME / NCCL_IB_HCA pass through from the env) ------
# a dead peer fails the job instead of hanging it
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"          # long IB retries ride out transient fabric errors
# (no CUDA_DEVICE_MAX_CONNECTIONS=1: it serves Megatron's TP-communication overlap, which this trainer does
# not use, and would funnel ZeRO's side-stream prefetch and reduce-scatter into one hardware queue)
# one thread per CPU that each rank gets (CPUS_PER_TASK above: the node's CPUs over its ranks, or as given)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$CPUS_PER_TASK}"

# --- trainer command ---------------------------------------------------------------------------------------
train=("$PYTHON" -m tokenformer_dist.train --config "$CONFIG" --run-dir "$RUN_DIR")
[[ -z "${DATA:-}" ]] || train+=(--data "$DATA")
[[ -z "${TP:-}" ]] || train+=(--tp "$TP")
if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then
  log "resuming from $RUN_DIR/checkpoints/$(cat "$RUN_DIR/checkpoints/latest")${INIT_FROM:+ (INIT_FROM ignored)}"
elif [[ -n "${INIT_FROM:-}" ]]; then
  [[ -e "$INIT_FROM" ]] || die "INIT_FROM=$INIT_FROM: no such checkpoint"
  train+=(--init-from "$INIT_FROM")
fi
train+=("$@")

# Not --kill-on-bad-exit: after a preemption signal every rank exits 75 once the checkpoint is complete, and
# killing the slower ranks when the first one exits would turn that into a failure. Instead --wait ends the
# remaining ranks SRUN_WAIT seconds after the first one exits (a crashed rank's peers block in a collective).
srun_args=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --ntasks="$WORLD" --cpus-per-task="$CPUS_PER_TASK"
  --kill-on-bad-exit=0 --wait="${SRUN_WAIT:-120}")
# GPUs: no per-task binding, so every task of a node sees the step's GPUs of that node (CUDA_VISIBLE_DEVICES
# 0..G-1) and picks cuda:LOCAL_RANK (launch.local_device); NCCL then sees its peers for NVLink P2P. Not
# --gpu-bind=none: Slurm 22.05 then sets no CUDA_VISIBLE_DEVICES at all. Per-task binding (a site default)
# works too: each task sees its own GPU as cuda:0. Both: tests/test_slurm.py::test_every_rank_gets_its_own_gpu
((GPUS_PER_NODE == 0)) || srun_args+=(--gpus-per-node="$GPUS_PER_NODE")

# --- time-limit warning: its lead covers what a stop costs this config (planning/cadence.py, SIGNAL_LEAD overrides) --
if [[ -z "${SIGNAL_LEAD:-}" ]]; then
  lead_args=(--config "$CONFIG" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --ranks-per-node "$TASKS_PER_NODE")
  SIGNAL_LEAD="$("$PYTHON" -m tokenformer_dist.cadence "${lead_args[@]}" --lead-seconds)" ||
    die "cannot derive the time-limit warning's lead from CONFIG=$CONFIG; set SIGNAL_LEAD (seconds)"
fi
is_int "$SIGNAL_LEAD" || die "SIGNAL_LEAD=$SIGNAL_LEAD is not a whole number of seconds"
end_time="$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null || true)"
warn_in=""
if [[ "$end_time" =~ ^[0-9]{4}- ]] && end_epoch="$(date -d "$end_time" +%s 2>/dev/null)"; then
  warn_in=$((end_epoch - $(date +%s) - SIGNAL_LEAD))
fi

log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $WORLD ranks ($NODES node(s) x $TASKS_PER_NODE," \
  "GPUs/node $GPUS_PER_NODE), rendezvous $MASTER_ADDR:$MASTER_PORT"
log "nodes $SLURM_JOB_NODELIST; $CPUS_PER_TASK CPU(s) and $OMP_NUM_THREADS OMP thread(s) per rank"
log "${train[*]}"

# --- signals -----------------------------------------------------------------------------------------------
# The trainer checkpoints on SIGTERM / SIGUSR1 and exits 75 (EXIT_PREEMPTED).
# USR1 reaches only this shell (from the timer below, SIGNAL_LEAD seconds before the time limit, or from
# `scancel --batch --signal=USR1`): pass it to the ranks through srun; when they exit 75, requeue this job,
# which then resumes from the checkpoint.
# TERM (scancel, `scontrol requeue`, preemption) is sent by Slurm to every process of the job, the ranks
# included: the shell keeps waiting so that the ranks can finish their checkpoint (within KillWait), and
# does not requeue (Slurm already requeues or cancels the job).
EXIT_PREEMPTED=75
got_term=0
srun_pid=""
# shellcheck disable=SC2317  # invoked by the trap
on_usr1() {
  log "SIGUSR1: time limit near; asking the trainer to checkpoint"
  [[ -z "$srun_pid" ]] || kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap on_usr1 USR1
trap '((got_term)) || log "SIGTERM: waiting for the trainer to checkpoint and exit"; got_term=1' TERM

srun "${srun_args[@]}" "${train[@]}" &
srun_pid=$!
timer_pid=""
if [[ -z "$warn_in" ]]; then
  log "no time limit found (squeue: ${end_time:-nothing}); no time-limit warning armed"
elif ((warn_in <= 0)); then
  log "time limit in $((warn_in + SIGNAL_LEAD)) s, less than the ${SIGNAL_LEAD} s a checkpoint and exit need" \
    "(SIGNAL_LEAD): no warning armed; a restart resumes from the last periodic checkpoint"
else
  log "time-limit warning (SIGUSR1) in $warn_in s, ${SIGNAL_LEAD} s before the limit ($end_time)"
  # a subshell that sleeps, then signals this shell ($$ is this shell's pid there); TERM ends it and its sleep
  (
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
    sleep "$warn_in" &
    sleep_pid=$!
    wait "$sleep_pid" && kill -USR1 $$
  ) &
  timer_pid=$!
fi
rc=0
while :; do
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # else a trapped signal interrupted `wait`: wait again
done
log "trainer exited with status $rc"
[[ -z "$timer_pid" ]] || kill "$timer_pid" 2>/dev/null || true

if ((rc == EXIT_PREEMPTED && !got_term)); then
  log "checkpoint saved; requeueing job $SLURM_JOB_ID"
  got_term=1  # the requeue's own SIGTERM to this shell is expected
  scontrol requeue "$SLURM_JOB_ID"
  sleep 300  # Slurm ends this shell as part of the requeue
fi
exit "$rc"
