"""Where a prefill's GPU time goes: the plain model (global) and Star Attention on one GPU, each run
once under ``torch.profiler`` after a warm-up, kernels grouped by name, sorted by total GPU time.
With ``--decode N``, Star's decode steps instead: a ``(1, 16)`` question and ``N`` decode steps through
the capturable step run without capture (``decode_graphs="static"``: the kernels a graph replays),
with the GPU time per forward (the question's and the ``N`` steps', ``N + 1`` in all; ``--compile``:
the model's element-wise work compiled).

    python tools/profile_prefill.py --context 128k --block 16k --anchor 16k --out runs/profile
    python tools/profile_prefill.py --context 128k --block 32k --anchor 32k --decode 32 --compile \
        --out runs/profile-decode

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


def profile(fn, device, rows: int, steps: int = 1) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    fn()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prof(activities=activities) as p:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = p.key_averages()
    table = events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
    if steps > 1 and device.type == "cuda":  # the kernels' own events (an op's row repeats its kernels' time)
        total_ms = sum(e.self_device_time_total for e in events
                       if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e3
        table += (f"\nGPU time {total_ms:.1f} ms in all, {total_ms / steps:.2f} ms per forward ({steps} forwards: "
                  "the question's and the decode steps')\n")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/models/llama-3.1-8b")
    p.add_argument("--context", default="128k")
    p.add_argument("--block", default="16k")
    p.add_argument("--anchor", default="16k")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--decode", type=int, default=0, help="profile N decode steps of Star instead of the prefills")
    p.add_argument("--compile", action="store_true", help="StarConfig(compile=True)")
    p.add_argument("--out", default="runs/profile")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bench._model(args.model, device, getattr(torch, args.dtype), 0)
    length = parse_length(args.context)
    if args.decode:  # room for the question and its new tokens in the model's positions
        length = bench.fit_context(length, model.config, 16, args.decode + 1)
    ids = bench._ids(length, model.config.vocab_size, 0, device)
    cfg = StarConfig(block_size=parse_length(args.block), anchor_size=parse_length(args.anchor), compile=args.compile,
                     decode_graphs="static")
    engine = StarEngine(model, cfg, attention="star")
    setting = f"context {length}, block {args.block}, anchor {args.anchor}{', compiled' if args.compile else ''}"
    if args.decode:
        context = engine.prefill(ids)
        question = bench._ids(16, model.config.vocab_size, 1, device)
        text = (f"## star decode, {setting}, {args.decode} steps\n"
                + profile(lambda: engine.generate(context, question, args.decode + 1), device, args.rows,
                          args.decode + 1))
        return _write(text, args.out)
    from star_sp import _compat

    def plain():
        _compat.set_attn_implementation(model, "sdpa")
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    tables = [f"## star, {setting}\n"
              + profile(lambda: engine.prefill(ids), device, args.rows),
              f"## global (plain model, SDPA), context {length}\n" + profile(plain, device, args.rows)]
    return _write("\n\n".join(tables), args.out)


def _write(text: str, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
