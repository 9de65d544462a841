#!/usr/bin/env bash
# The README's accuracy table: every task at 4K, 8K and 16K tokens, global attention and Star Attention
# (block 1/4 and 1/8 of the length; anchor = block, block/4, and none). One process per task on one GPU
# (the model is small: the tasks run side by side), each running all seven methods on a sample before the
# next, so every sample is generated once; then one summary over all rows. Each process stops after
# SECONDS and a rerun resumes (the summary covers what finished: check the row counts).
#   bash tools/eval_reference.sh MODEL OUT [SAMPLES] [SECONDS]
# GPUS="0 1" spreads the processes over those GPUs (round robin; default: the first GPU); LENGTHS="1k"
# other lengths (a quick check); SEED another draw of samples (default 0); BLOCKS and ANCHORS other Star
# settings (defaults 1/4,1/8 and block,block/4,0); TASKS a subset (default all).
set -uo pipefail
model=$1 out=$2 samples=${3:-8} seconds=${4:-420}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1  # 12 processes share the cores
read -r -a gpus <<< "${GPUS:-0}"
tasks=${TASKS:-$(python3 -c "from star_sp.eval.tasks import TASKS; print(' '.join(TASKS))")}
mkdir -p "$out"
n=0
for task in $tasks; do
    CUDA_VISIBLE_DEVICES=${gpus[$(( n % ${#gpus[@]} ))]} timeout "$seconds" python3 -m star_sp.apps.cli eval \
        --model "$model" --tasks "$task" --lengths "${LENGTHS:-4k,8k,16k}" --samples "$samples" --dtype bfloat16 --quiet \
        --seed "${SEED:-0}" --attention global,star --block-size "${BLOCKS:-1/4,1/8}" --anchor-size "${ANCHORS:-block,block/4,0}" \
        --out "$out/$task" > "$out/$task.log" 2>&1 &
    n=$(( n + 1 ))
done
wait
mkdir -p "$out/all" && cat "$out"/*/results.jsonl > "$out/all/results.jsonl"
python3 - "$out/all" <<'PY'
import collections, json, os, sys
from star_sp.eval.plots import write_plots
from star_sp.eval.runner import load_done, markdown_table, write_summary
out = sys.argv[1]
rows = list(load_done(os.path.join(out, "results.jsonl")).values())
print("rows per method:", dict(collections.Counter(r["method"] for r in rows)))
summary = write_summary(rows, out)
write_plots(summary, out)
print(markdown_table(summary))
PY
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; echo "SEED=${SEED:-0} BLOCKS=${BLOCKS:-1/4,1/8} ANCHORS=${ANCHORS:-block,block/4,0} TASKS='${TASKS:-all}' LENGTHS=${LENGTHS:-4k,8k,16k}"
  echo "bash tools/eval_reference.sh $*"; } > "$out/all/provenance.txt"
