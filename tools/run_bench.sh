#!/usr/bin/env bash
# The benchmark on the GPU machine: one H200 (block-sparse star vs global) and, when given 2+ GPUs, every
# method side by side under torchrun. Results land in OUT (bench.json, bench.md per run).
#   bash tools/run_bench.sh OUT [NPROC] [CONTEXTS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/star-sp-bench}} nproc=${2:-2} contexts=${3:-16k,32k,64k,128k}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p "$out"
if [ "$nproc" -gt 1 ]; then
  python3 -m torch.distributed.run --nproc_per_node "$nproc" tools/bench.py --contexts "$contexts" \
    --project 4,8 --out "$out/x$nproc" 2>&1 | tail -40
else
  python3 tools/bench.py --contexts "$contexts" --methods global,star --blocks 32k,16k --anchors block \
    --out "$out/x1" 2>&1 | tail -20
fi
