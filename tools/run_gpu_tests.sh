#!/usr/bin/env bash
# Run the GPU tests, the kernel probe and the error report on a machine with CUDA.
#   bash tools/run_gpu_tests.sh [OUTDIR]
# Uses the machine's own torch (no install); star_sp is taken from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/star-sp-gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 tools/gpu_probe.py 2>&1 | tee "$out/probe.txt"
python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
status=${PIPESTATUS[0]}
python3 tools/error_report.py --device cuda --json "$out/errors.json" 2>&1 | tee "$out/errors.txt"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then  # ring and Star across GPUs (NCCL) against the oracle, the engine against one process
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python3 -m torch.distributed.run --nproc_per_node "$gpus" \
    tools/multi_gpu_check.py 2>&1 | tee "$out/multi_gpu.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit "$status"
