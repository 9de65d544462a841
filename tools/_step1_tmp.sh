set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
python3 tools/train_reference.py --out $OUT/ref1 --min-length 256 --max-length 4096 --minutes 8 --workers 14 \
  --tokens-per-batch 16384 --log-every 100 --lr 1e-3 > $OUT/ref1.log 2>&1
tail -1 $OUT/ref1.log
tar -C $OUT -czf $OUT/ref1.tgz ref1 && rm -rf $OUT/ref1
