"""Correctness across processes on the GPU machine (NCCL), before any timing: one process per GPU.

    python3 -m torch.distributed.run --nproc_per_node 2 tools/multi_gpu_check.py

Checks, on every rank, against the float64 oracle computed on the CPU: exact ring attention (output,
log-sum-exp and gradients) and the two Star phases (output), in float32 and bfloat16; then the
engine: greedy tokens of a tiny float32 model under Star (anchor broadcast and recomputed) and ring
attention equal those of one process. Prints one line per check and exits 1 if any fails. Without
CUDA it runs on gloo and the CPU (float64 and float32), which is how it is tested.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from star_sp import BlockLayout, StarConfig, StarEngine  # noqa: E402
from star_sp.distributed import phase1_attention, phase2_attention, ring_attention  # noqa: E402
from star_sp.distributed.process_group import init_from_env  # noqa: E402
from star_sp.layout import RingLayout  # noqa: E402
from star_sp.ops import reference_attention, star_mask  # noqa: E402

# largest error against the float64 oracle allowed per dtype: (outputs, gradients); the measured
# single-layer errors are ~1e-6 / 5e-6 in float32 and ~2e-2 / 1e-1 in bfloat16 (README, oracle table)
BOUNDS = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 5e-4), torch.bfloat16: (5e-2, 2.5e-1)}


def _qkv(total: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(2, h, total, 64, generator=gen, dtype=torch.float64)  # noqa: E731
    return mk(8), mk(2), mk(2), mk(8)


def _err(a, b) -> float:
    return (a.detach().double().cpu() - b.double()).abs().max().item()


def check_ring(group, device, dtype) -> list[tuple[str, float, float]]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    length = 97 * world + 13
    q, k, v, g = _qkv(length)
    layout = RingLayout(length, world, rank)
    xs = [layout.shard(t, 2).to(device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(*xs, layout, group=group)
    (out * layout.shard(g, 2).to(device, dtype)).sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref, torch.ones(length, length, dtype=torch.bool).tril())
    grads = torch.autograd.grad((ref_out * g).sum(), ref)
    rows = layout.positions()
    bound_out, bound_grad = BOUNDS[dtype]
    found = [("ring out", _err(out, ref_out[:, :, rows]), bound_out),
             ("ring lse", _err(lse, ref_lse[:, :, rows]), bound_out)]
    for name, x, grad in zip("qkv", xs, grads):  # dk, dv of this rank's rows hold every rank's share
        found.append((f"ring d{name}", _err(x.grad, grad[:, :, rows]), bound_grad))
    return found


def check_star(group, device, dtype, anchor_source: str) -> list[tuple[str, float, float]]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lc, lq, block, anchor = 61 * world + 7, 5, 61, 29
    q, k, v, _ = _qkv(lc + lq, seed=1)
    layout = BlockLayout(lc, block, anchor, world, rank)
    recompute = anchor_source == "recompute"
    start, end = layout.token_range
    rows = list(range(layout.anchor_rows(recompute))) + list(range(start, end))
    x1 = [t[:, :, rows].to(device, dtype) for t in (q, k, v)]
    out1, _ = phase1_attention(*x1, layout, group=group, anchor_source=anchor_source)
    own = len(rows) - (end - start)
    qk = qv = None
    if layout.is_query_host:
        qk, qv = (t[:, :, lc:].to(device, dtype) for t in (k, v))
    out2, _ = phase2_attention(q[:, :, lc:].to(device, dtype), x1[1][:, :, own:], x1[2][:, :, own:], group=group,
                               query_k=qk, query_v=qv)
    ref, _ = reference_attention(q, k, v, star_mask(lc, block, anchor, lq))
    bound = BOUNDS[dtype][0]
    return [(f"star {anchor_source} phase 1", _err(out1[:, :, own:], ref[:, :, start:end]) if end > start else 0.0,
             bound), (f"star {anchor_source} phase 2", _err(out2, ref[:, :, lc:]), bound)]


def check_engine(group, device) -> list[tuple[str, float, float]]:
    from star_sp.testing import build

    model, _ = build("llama", dtype=torch.float32)
    model.to(device)
    gen = torch.Generator().manual_seed(3)
    ctx = torch.randint(4, model.config.vocab_size, (1, 53 * dist.get_world_size(group)), generator=gen)
    qry = torch.randint(4, model.config.vocab_size, (1, 4), generator=gen)
    found = []
    for attention, source in (("star", "broadcast"), ("star", "recompute"), ("ring", "broadcast")):
        one = StarEngine(model, StarConfig(block_size=53, anchor_size=17, anchor_source=source), attention=attention)
        single = one.generate(one.prefill(ctx), qry, 8)
        many = StarEngine(model, StarConfig(block_size=53, anchor_size=17, anchor_source=source), group,
                          attention=attention)
        tokens = many.generate(many.prefill(ctx), qry, 8)
        found.append((f"engine {attention} {source}: tokens equal one process", float(not torch.equal(tokens, single)),
                      0.0))
    return found


def main() -> int:
    group, device, created = init_from_env(300.0)
    if group is None:
        raise SystemExit("run under torchrun with 2 or more processes")
    rank = dist.get_rank(group)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float64, torch.float32)
    results = []
    for dtype in dtypes:
        for name, err, bound in check_ring(group, device, dtype) + check_star(group, device, dtype, "broadcast") + \
                check_star(group, device, dtype, "recompute"):
            results.append((f"{name} [{str(dtype)[6:]}]", err, bound))
    results += check_engine(group, device)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, results, group=group)
    failed = 0
    if rank == 0:
        for r, rows in enumerate(gathered):
            for name, err, bound in rows:
                ok = err <= bound
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} rank {r} {name}: error {err:.3g} (bound {bound:.3g})")
        print(f"{failed} check(s) failed on {len(gathered)} process(es), {device.type}")
    box = [failed]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    if created:
        dist.destroy_process_group()
    return 1 if box[0] else 0


if __name__ == "__main__":
    raise SystemExit(main())
