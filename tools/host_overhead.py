"""Host overhead of Star Attention's prefill and decode loop, against the plain transformers model.

A narrow model with many layers makes the per-layer Python and launch work dominate, as it does when
decoding is host-bound on a GPU. One process; median of ``--repeats`` runs::

    python tools/host_overhead.py --layers 32 --context 2048 --tokens 48

Prints the plain model's decode ms/token (``generate``, SDPA, its own cache) and Star's prefill
seconds and decode ms/token (one process, block ``--block``, anchor ``--anchor``). Random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from star_sp import StarConfig, StarEngine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--anchor", type=int, default=256)
    p.add_argument("--tokens", type=int, default=48, help="decoded tokens timed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (one keeps the timing steady)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=args.context + args.tokens + 64)
    model = LlamaForCausalLM(cfg).to(args.device).eval()
    ctx = torch.randint(0, 1000, (1, args.context), device=args.device)
    query = torch.randint(0, 1000, (1, 8), device=args.device)

    def plain(n):
        with torch.no_grad():
            model.generate(torch.cat([ctx, query], 1), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    plain(4)
    per_token = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        plain(1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        plain(args.tokens + 1)
        per_token.append(1000 * (time.perf_counter() - t - one) / args.tokens)
    engine = StarEngine(model, StarConfig(block_size=args.block, anchor_size=args.anchor), attention="star")
    engine.generate(engine.prefill(ctx), query, 4)
    prefill, decode = [], []
    for _ in range(args.repeats):
        context = engine.prefill(ctx)
        prefill.append(engine.stats["prefill_s"])
        engine.generate(context, query, args.tokens + 1)
        decode.append(1000 / engine.stats["decode_tokens_per_s"])
    print(f"plain decode ms/token {statistics.median(per_token):.2f}; star prefill s {statistics.median(prefill):.3f}, "
          f"decode ms/token {statistics.median(decode):.2f} ({args.layers} layers, hidden {args.hidden}, "
          f"context {args.context}, block {args.block}, anchor {args.anchor}, {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
