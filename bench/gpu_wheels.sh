#!/usr/bin/env bash
# Prepare, on a machine WITH network, the wheels an air-gapped GPU node needs to run the trainer and
# bench/gpu_acceptance.sh on its own python3 and torch: everything the trainer (and the GPU tests) import
# that a CUDA torch image usually lacks. torch itself is never downloaded.
#
#   bash bench/gpu_wheels.sh [--python-version 3.12] [--out .whl]
#
# DeepSpeed publishes only an sdist: it is built here into a py3-none-any wheel (no ops prebuilt; its JIT
# ops are not used by this trainer). Everything else is a binary wheel for CPython X.Y on manylinux x86_64.
# Prints the total size; fails if it exceeds 64 MiB. Ray is not in the set: the trainer never imports it.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
PYVER=3.12
OUT=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu_wheels.sh [--python-version X.Y] [--out DIR]" >&2; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_wheels: $PY cannot import torch (needed to build the DeepSpeed wheel)" >&2
  exit 2
fi
mkdir -p "$OUT"
# Pinned to the versions the CPU CI tests (pyproject.toml, the shared venv).
PKGS=(
  megatron-core==0.16.1
  einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  pyyaml==6.0.4 packaging==26.4 tqdm==4.70.1 numpy==2.4.6
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d "$OUT" "${PKGS[@]}"
if ! ls "$OUT"/deepspeed-0.19.8-py3-none-any.whl >/dev/null 2>&1; then
  # --no-build-isolation: DeepSpeed's setup.py imports torch; DS_BUILD_OPS=0 builds no op ahead of time
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
fi
bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
count=$(find "$OUT" -name '*.whl' | wc -l)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "gpu_wheels: $count wheels for cp${PYVER/./} in $OUT, $mib MiB ($bytes bytes)"
if [ "$bytes" -ge $((64 * 1048576)) ]; then
  echo "gpu_wheels: over the 64 MiB budget" >&2
  exit 1
fi
