"""Where a prefill's GPU time goes: the plain model (global) and Star Attention on one GPU, each run
once under ``torch.profiler`` after a warm-up, kernels grouped by name, sorted by total GPU time.

    python tools/profile_prefill.py --context 128k --block 16k --anchor 16k --out runs/profile

Writes ``OUT/profile.txt`` (one table per method) and prints it. Model: the benchmark's
Llama-3.1-8B shape with random bf16 weights. Needs CUDA for GPU times (on CPU it profiles CPU time).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

from star_sp import StarConfig, StarEngine  # noqa: E402
from star_sp.eval.runner import parse_length  # noqa: E402


def profile(fn, device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    fn()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prof(activities=activities) as p:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/models/llama-3.1-8b")
    p.add_argument("--context", default="128k")
    p.add_argument("--block", default="16k")
    p.add_argument("--anchor", default="16k")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default="runs/profile")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bench._model(args.model, device, getattr(torch, args.dtype), 0)
    length = parse_length(args.context)
    ids = bench._ids(length, model.config.vocab_size, 0, device)
    engine = StarEngine(model, StarConfig(block_size=parse_length(args.block), anchor_size=parse_length(args.anchor)),
                        attention="star")
    from star_sp import _compat

    def plain():
        _compat.set_attn_implementation(model, "sdpa")
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    tables = [f"## star, context {length}, block {args.block}, anchor {args.anchor}\n"
              + profile(lambda: engine.prefill(ids), device, args.rows),
              f"## global (plain model, SDPA), context {length}\n" + profile(plain, device, args.rows)]
    text = "\n\n".join(tables)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
