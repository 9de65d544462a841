#!/usr/bin/env bash
# star-sp generate under torchrun on 2 GPUs (NCCL) with a Llama-3.1-8B-shaped model (random bf16 weights):
# star with the anchor broadcast and recomputed, next to global attention on one GPU.
#   bash tools/run_engine_x2.sh [CONTEXT_TOKENS] [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
ctx=${1:-32768}
out=${2:-${OUT:-/tmp/star-sp-engine}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
common=(--config configs/llama-3.1-8b-random.toml --random-context "$ctx" --random-query 16 --max-new-tokens 64 --json --quiet --warmup)
for source in broadcast recompute; do
  python3 -m torch.distributed.run --nproc_per_node 2 launch/infer.py "${common[@]}" --anchor-source "$source" \
    | grep '^{' | tee "$out/engine_star2_${source}_${ctx}.json"
done
python3 -m star_sp.apps.cli generate "${common[@]}" --attention global | tee "$out/engine_global1_${ctx}.json"
