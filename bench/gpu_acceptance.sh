#!/usr/bin/env bash
# GPU acceptance: one command on a machine with one CUDA GPU (H100/H200 class) and no network.
#
#   bash bench/gpu_acceptance.sh            # after `bash bench/gpu_wheels.sh` (with network) filled .whl/
#
# 1. the machine's own python3 and torch; megatron-core, DeepSpeed,
#    zarr, pytest, ... installed from .whl/ with pip --no-index (skipped when already importable);
# 2. the GPU-marked tests (tests/test_gpu.py: NCCL world of 1; fp32 + bf16 train, resume, evaluate,
#    expand; fp32 GPU loss == CPU loss within 1e-5);
# 3. owt_124m in bf16 for STEPS (default 100) steps on a synthetic dataset: tokens/s, MFU, peak memory,
#    against tools/plan.py's prediction when the planner exists.
# Ends with one summary line; exit 0 all passed, 1 a failure, 2 no GPU here.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
STEPS=${STEPS:-100}
WORK=${WORK:-$REPO/.gl}
t0=$SECONDS

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_acceptance: no CUDA GPU visible to $PY's torch; this script needs one (exit 2)"
  exit 2
fi
mkdir -p "$WORK"
fail() {
  echo "gpu_acceptance: FAIL ($1) after $((SECONDS - t0)) s"
  exit 1
}

# 1. environment: the machine's own python3 and torch; the rest from .whl/ into a target dir on PYTHONPATH
# (not a venv: where torch lives outside the interpreter's site-packages — user site, PYTHONPATH, a container
# layer — a --system-site-packages venv does not see it)
SITE=$WORK/site
VPY=$PY
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
if ! "$VPY" -c "import deepspeed, megatron.core, zarr, pytest, pytest_timeout" 2>/dev/null; then
  [ -d .whl ] || fail "megatron-core/DeepSpeed missing and no .whl/ (run bench/gpu_wheels.sh where there is network)"
  # --no-deps: the machine's torch (often a pre-release build such as 2.11.0a0 in NGC containers, which pip's
  # resolver does not accept for torch>=2.6) must stay; .whl/ holds every other dependency
  wheels=()
  for w in .whl/*.whl; do
    case "$w" in .whl/numpy-*) "$VPY" -c "import numpy" 2>/dev/null && continue ;; esac
    wheels+=("$w")
  done
  "$VPY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" || fail "pip install from .whl"
fi
"$VPY" - <<'PYEOF' || fail "imports"
import deepspeed, megatron.core, torch
print(f"gpu_acceptance: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}")
PYEOF
unset SLURM_PROCID RANK WORLD_SIZE LOCAL_RANK

# 2. GPU-marked tests
tests_log=$WORK/tests.log
"$VPY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$tests_log" | tail -5
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E "passed|failed|error" "$tests_log" | tail -1)
if grep -q "skipped" <<<"$tests_line" && ! grep -q "passed" <<<"$tests_line"; then
  tests_rc=1
fi

# 3. owt_124m bf16 throughput
DATA=$WORK/owt_synthetic
RUN=$WORK/owt_124m_run
rm -rf "$RUN"
"$VPY" -c "from pathlib import Path; from tokenformer_dist.data import write_synthetic_dataset as w
p = Path('$DATA'); (p / 'manifest.json').is_file() or w(p, 50304, 2_000_000, 200_000)" || fail "dataset"
"$VPY" -m torch.distributed.run --nproc_per_node 1 --master_port 29517 -m tokenformer_dist.train \
  --config configs/owt_124m.yaml --data "$DATA" --run-dir "$RUN" --steps "$STEPS" --set parallel.dtype=bf16 \
  --set train.log_every=10 --set train.eval_every=1000000 --set train.save_every=1000000 \
  --set train.warmup_frac=0.1 >"$WORK/owt_124m.log" 2>&1
train_rc=$?
grep -E "^step" "$WORK/owt_124m.log" | tail -4
gpu_name=$("$VPY" -c "import torch; print(torch.cuda.get_device_name(0))")
case "$gpu_name" in
  *H200*) plan_gpu=h200 ;; *H100*) plan_gpu=h100 ;; *A100*) plan_gpu=a100 ;; *) plan_gpu="" ;;
esac
plan_json=""
if [ -f tools/plan.py ] && [ -n "$plan_gpu" ]; then
  # the planner's prediction for the layout this run used (the config's), not its own best layout
  read -r p_tp p_mb p_zero p_ac < <("$VPY" -c "from tokenformer_dist.config import load_config as l
c = l('configs/owt_124m.yaml'); p = c.parallel
print(p.tp, c.train.micro_batch_size, p.zero_stage, 'on' if p.activation_checkpointing else 'off')")
  plan_json=$("$VPY" tools/plan.py --config configs/owt_124m.yaml --nodes 1 --gpus-per-node 1 --gpu "$plan_gpu" \
    --tp "$p_tp" --micro-batch "$p_mb" --zero-stage "$p_zero" --activation-checkpointing "$p_ac" 2>/dev/null | tail -1)
fi
bench_line=$("$VPY" - "$RUN/metrics.jsonl" "$plan_json" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
path, plan = Path(sys.argv[1]), sys.argv[2]
recs = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
recs = [r for r in recs if "tokens_per_s" in r]
if not recs:
    print("owt_124m bf16: no metrics"); sys.exit(1)
steady = recs[1:] or recs  # the first logging window includes start-up and compilation of kernels
tok = statistics.median(r["tokens_per_s"] for r in steady)
mfu = statistics.median(r.get("mfu") or 0.0 for r in steady)
mem = max(r["mem_gb"] for r in recs)
line = f"owt_124m bf16 {recs[-1]['step']} steps: {tok:,.0f} tokens/s, MFU {mfu:.1%}, peak memory {mem:.1f} GiB"
try:
    p = json.loads(plan)
    line += (f"; planner: {p['tokens_per_s']:,.0f} tokens/s, MFU {p['mfu']:.1%}, {p['mem_gb_per_gpu']:.1f} GB/GPU")
except (ValueError, KeyError, TypeError):
    line += "; planner: n/a"
print(line)
PYEOF
)
bench_rc=$?
echo "$bench_line"

took=$((SECONDS - t0))
if [ "$tests_rc" -eq 0 ] && [ "$train_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]; then
  echo "gpu_acceptance: PASS in ${took} s | tests: ${tests_line} | ${bench_line}"
  exit 0
fi
echo "gpu_acceptance: FAIL in ${took} s | tests (rc ${tests_rc}): ${tests_line} | train rc ${train_rc} | ${bench_line}"
exit 1
