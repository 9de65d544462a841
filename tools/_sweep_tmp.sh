set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used --format=csv
common="--min-length 256 --max-length 2048 --minutes 4.5 --workers 3 --tokens-per-batch 16384 --log-every 50"
python3 tools/train_reference.py --out $OUT/A $common --lr 1e-3 > $OUT/A.log 2>&1 &
python3 tools/train_reference.py --out $OUT/B $common --lr 3e-3 > $OUT/B.log 2>&1 &
python3 tools/train_reference.py --out $OUT/C $common --lr 1e-3 --hidden 384 --heads 6 --kv-heads 2 > $OUT/C.log 2>&1 &
python3 tools/train_reference.py --out $OUT/D $common --lr 2e-3 --heads 4 --kv-heads 2 --context-weight 1.0 > $OUT/D.log 2>&1 &
sleep 120; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; uptime
wait
for x in A B C D; do echo "== $x"; tail -2 $OUT/$x.log | cut -c1-600; done
