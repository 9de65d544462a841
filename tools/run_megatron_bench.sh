#!/usr/bin/env bash
# The Megatron-core integration on the GPU machine (one H200): its CPU tests against the carried
# megatron-core wheel (and the benchmark's own CPU smoke test), then one training step, Star against global attention (tools/bench_megatron.py).
#   bash tools/run_megatron_bench.sh [OUT] [CONTEXTS] [LAYERS]
# Writes OUT/megatron-cpu-tests-0.19.2.txt, OUT/bench_megatron.{json,md} and OUT/bench_megatron.txt (its log).
# megatron-core is installed from .whl/ (no index, no dependencies) only when none is importable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/star-sp-megatron}} contexts=${2:-16k,32k,64k} layers=${3:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
if ! python3 -c 'import megatron.core' 2>/dev/null; then
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-deps --no-index .whl/megatron_core-0.19.2-*.whl || exit 1
fi
version=$(python3 -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null) || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
{ echo "megatron-core $version"; python3 -m pytest -q -p no:cacheprovider tests/test_megatron.py \
  tests/test_bench_megatron.py 2>&1; } \
  | tee "$out/megatron-cpu-tests-0.19.2.txt" | tail -5
status=${PIPESTATUS[0]}
python3 tools/bench_megatron.py --layers "$layers" --contexts "$contexts" --repeats 2 --out "$out" 2>&1 \
  | tee "$out/bench_megatron.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
