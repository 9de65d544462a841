#!/usr/bin/env bash
# star-sp generate on one GPU with a Llama-3.1-8B-shaped model (random bf16 weights), star and global
# attention side by side at one context length. Uses the machine's torch and transformers.
#   bash tools/run_engine_h200.sh [CONTEXT_TOKENS] [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
ctx=${1:-32768}
out=${2:-${OUT:-/tmp/star-sp-engine}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$out/versions.txt"
for attention in star global; do
  python3 -m star_sp.apps.cli generate --config configs/llama-3.1-8b-random.toml --random-context "$ctx" \
      --random-query 16 --max-new-tokens 64 --attention "$attention" --json --quiet --warmup | tee "$out/engine_${attention}_${ctx}.json"
done
