#!/usr/bin/env bash
# The README's accuracy table: every task at 4K, 8K and 16K tokens, global attention and Star Attention
# (block 1/4 and 1/8 of the length; anchor = block, block/4, and none), one process per method on one
# GPU (the model is small: the methods run side by side), then one summary over all rows (each method
# stops after SECONDS; the summary covers what finished: check the row counts).
#   bash tools/eval_reference.sh MODEL OUT [SAMPLES] [SECONDS]
# GPUS="0 1" spreads the methods over those GPUs (round robin; default: the first GPU).
set -uo pipefail
model=$1 out=$2 samples=${3:-8} seconds=${4:-420}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
read -r -a gpus <<< "${GPUS:-0}"
n=0
ev() { name=$1; shift  # on GPU number n of GPUS, round robin (n counts the methods started)
  CUDA_VISIBLE_DEVICES=${gpus[$(( n % ${#gpus[@]} ))]} timeout "$seconds" python3 -m star_sp.cli eval --model "$model" --tasks all \
    --lengths 4k,8k,16k --samples "$samples" --dtype bfloat16 --quiet --out "$out/$name" "$@" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
ev global --attention global &
n=$(( n + 1 ))
for block in 1/4 1/8; do
    for anchor in block block/4 0; do
        ev "star-b${block/\//_}-a${anchor/\//_}" --attention star --block-size "$block" --anchor-size "$anchor" &
        n=$(( n + 1 ))
    done
done
wait
mkdir -p "$out/all" && cat "$out"/*/results.jsonl > "$out/all/results.jsonl"
python3 - "$out/all" <<'PY'
import os, sys
from star_sp.eval.plots import write_plots
from star_sp.eval.runner import load_done, markdown_table, write_summary
out = sys.argv[1]
summary = write_summary(list(load_done(os.path.join(out, "results.jsonl")).values()), out)
write_plots(summary, out)
print(markdown_table(summary))
PY
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; echo "bash tools/eval_reference.sh $*"; } > "$out/all/provenance.txt"
