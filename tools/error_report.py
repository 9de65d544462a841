"""Largest error against the float64 oracle, per backend and dtype, for one Star Attention layer.

    python tools/error_report.py [--device cpu|cuda] [--json OUT.json]

Runs ``star_sp.ops.star_attention`` (phase 1 as a block-sparse prefill plus phase 2, every block
local) on awkward sizes (ragged last block, anchor < block, GQA, several query rows) with every backend
that supports the device and dtype, forward and backward, and prints the maximum absolute error of the
output, the log-sum-exp and the gradients against dense float64 ``M_star`` attention, next to the
error of the plain implementation in the same dtype (the ``math`` backend), which bounds it in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from star_sp.ops import KERNELS, reference_attention, star_attention, star_mask

SIZES = [  # (context, query, block, anchor, heads, kv_heads, head_dim)
    (1000, 7, 300, 75, 8, 2, 64),
    (777, 1, 128, 128, 4, 4, 128),
    (513, 16, 100, 33, 6, 2, 96),
]


def run(device: str) -> list[dict]:
    rows = []
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if device == "cpu" else [])
    for lc, lq, b, a, h, hkv, d in SIZES:
        gen = torch.Generator().manual_seed(lc)
        q = torch.randn(2, h, lc + lq, d, generator=gen, dtype=torch.float64)
        k = torch.randn(2, hkv, lc + lq, d, generator=gen, dtype=torch.float64)
        v = torch.randn(2, hkv, lc + lq, d, generator=gen, dtype=torch.float64)
        g = torch.randn(2, h, lc + lq, d, generator=gen, dtype=torch.float64)
        ref = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
        ref_out, ref_lse = reference_attention(*ref, star_mask(lc, b, a, lq))
        ref_grads = torch.autograd.grad((ref_out * g).sum(), ref)
        for dtype in dtypes:
            for name, kernel in KERNELS.items():
                xs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
                if kernel.unsupported(xs[0], xs[1]) is not None:
                    continue
                out, lse = star_attention(*xs, context_len=lc, block_size=b, anchor_size=a, backend=name)
                grads = torch.autograd.grad((out * g.to(device, dtype)).sum(), xs)
                err = lambda x, y: (x.double().cpu() - y).abs().nan_to_num(float("inf")).max().item()  # noqa: E731
                rows.append({
                    "size": f"Lc={lc} Lq={lq} b={b} a={a} H={h}/{hkv} D={d}", "device": device,
                    "dtype": str(dtype).replace("torch.", ""), "backend": name,
                    "out": err(out, ref_out), "lse": err(lse, ref_lse),
                    "grad": max(err(x, y) for x, y in zip(grads, ref_grads)),
                })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = run(args.device)
    worst: dict[tuple, dict] = {}
    for r in rows:
        key = (r["backend"], r["dtype"])
        w = worst.setdefault(key, {"out": 0.0, "lse": 0.0, "grad": 0.0})
        for f in ("out", "lse", "grad"):
            w[f] = max(w[f], r[f])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# max |error| vs float64 oracle; torch {torch.__version__}, {dev}, python {sys.version.split()[0]}")
    print("| backend | dtype | out | lse | grads |\n|---|---|---|---|---|")
    for (backend, dtype), w in sorted(worst.items()):
        print(f"| {backend} | {dtype} | {w['out']:.2e} | {w['lse']:.2e} | {w['grad']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
