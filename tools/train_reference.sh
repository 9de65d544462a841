#!/usr/bin/env bash
# Reproduce the shipped reference model (star_sp/models/reference). The budgets are wall-clock, so step
# counts vary a little with hardware. Steps 1-2 on one H200, in two device calls of under 10 minutes:
#   bash tools/train_reference.sh 1 OUT   # 8 min: 256 -> 4096 tokens, from scratch  -> OUT/ref1
#   bash tools/train_reference.sh 2 OUT   # 8.3 min: 4096 -> 16384 tokens, from OUT/ref1 -> OUT/ref2
# Then data-parallel (NPROC GPUs; budgets shortened because k GPUs see k times the tokens):
#   NPROC=3 MINUTES=3.5 bash tools/train_reference.sh 3 OUT   # 512 -> 2048, weighted to qa/cwe/fwe/vt -> OUT/ref3
#   NPROC=3 MINUTES=4.5 bash tools/train_reference.sh 4 OUT   # 4096 -> 16384 -> OUT/ref4
#   NPROC=3 MINUTES=3.4 bash tools/train_reference.sh 5 OUT   # 512 -> 2048, qa (made-up builders) heavy -> OUT/ref5
#   NPROC=3 MINUTES=4.2 bash tools/train_reference.sh 6 OUT   # 4096 -> 16384 -> OUT/ref6
#   NPROC=4 bash tools/train_reference.sh 7 OUT                # 4096 -> 16384, word tasks and multi-key -> OUT/ref7
# The shipped model is OUT/ref7 (2026-11-28, 4-H200 machine; steps 3-6 with WORKERS=14-16 on three GPUs,
# step 7 with WORKERS=14 on four). Step 3 started from star_sp/models/reference at commit 2ed8364 (= ref2).
# Each writes training_log.jsonl and recipe.json beside the weights (shipped as *_stageN for N < 7).
# NPROC=k trains data-parallel on k GPUs (torchrun; MINUTES=m overrides the step's budget, WORKERS the
# data workers per rank).
set -euo pipefail
step=$1 out=$2
nproc=${NPROC:-1}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
workers=${WORKERS:-$(( $(nproc) / nproc - 2 ))}
python3() {  # one process, or one per GPU
  if [ "$nproc" = 1 ]; then command python3 "$@"; else command python3 -m torch.distributed.run --nproc_per_node "$nproc" "$@"; fi
}
minutes() { echo "${MINUTES:-$1}"; }
case $step in
1) python3 tools/train_reference.py --out "$out/ref1" --min-length 256 --max-length 4096 --minutes 8 \
       --workers 14 --tokens-per-batch 16384 --log-every 100 --lr 1e-3 ;;
2) python3 tools/train_reference.py --out "$out/ref2" --init "$out/ref1" --min-length 4096 --max-length 16384 \
       --minutes 8.3 --workers 14 --tokens-per-batch 32768 --log-every 50 --lr 5e-4 --stage-shares 1,1,2 \
       --weights qa=3,vt=2,cwe=2,fwe=2 ;;
3) python3 tools/train_reference.py --out "$out/ref3" --init "$out/ref2" --min-length 512 --max-length 2048 \
       --minutes "$(minutes 6)" --workers "$workers" --tokens-per-batch 16384 --log-every 100 --lr 5e-4 --weights qa=6,cwe=4,fwe=4,vt=3 ;;
4) python3 tools/train_reference.py --out "$out/ref4" --init "$out/ref3" --min-length 4096 --max-length 16384 \
       --minutes "$(minutes 7)" --workers "$workers" --tokens-per-batch 32768 --log-every 50 --lr 3e-4 --stage-shares 1,1,2 \
       --weights qa=3,cwe=3,fwe=3,vt=2 ;;
5) python3 tools/train_reference.py --out "$out/ref5" --init "$out/ref4" --min-length 512 --max-length 2048 \
       --minutes "$(minutes 4)" --workers "$workers" --tokens-per-batch 16384 --log-every 100 --lr 5e-4 \
       --weights qa=8,cwe=3,niah_multikey=2,niah_multivalue=2,vt=2 ;;
6) python3 tools/train_reference.py --out "$out/ref6" --init "$out/ref5" --min-length 4096 --max-length 16384 \
       --minutes "$(minutes 5)" --workers "$workers" --tokens-per-batch 32768 --log-every 50 --lr 3e-4 --stage-shares 1,1,2 \
       --weights qa=4,cwe=3,niah_multikey=3,niah_multivalue=2,vt=2 ;;
7) python3 tools/train_reference.py --out "$out/ref7" --init "$out/ref6" --min-length 4096 --max-length 16384 \
       --minutes "$(minutes 3)" --workers "$workers" --tokens-per-batch 32768 --log-every 50 --lr 2e-4 --stage-shares 1,1,2 \
       --weights cwe=4,fwe=3,niah_multikey=3,niah_multivalue=2,qa=2,vt=2 ;;
*) echo "usage: $0 1|2|3|4|5|6|7 OUT" >&2; exit 2 ;;
esac
