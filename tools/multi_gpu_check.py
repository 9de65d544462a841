"""Correctness across processes on the GPU machine (NCCL), before any timing: one process per GPU.

    python3 -m torch.distributed.run --nproc_per_node 2 tools/multi_gpu_check.py

Checks, on every rank, against the float64 oracle computed on the CPU: exact ring attention (output,
log-sum-exp and gradients) and the two Star phases (outputs and q, k, v gradients), in float32 and bfloat16, each within a
bound derived from the plain implementation's error in the same dtype (``_bound``); then the
engine: greedy tokens of a tiny float32 model under Star (anchor broadcast and recomputed) and ring
attention equal those of one process; and training: ``star_train_loss`` + ``reduce_gradients``, every
parameter gradient against the float64 oracle (``check_training``). Prints one line per check and exits 1 if any fails. Without
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

# How far a low-precision result may be from the float64 oracle: FACTOR times the error of the plain
# implementation in the same dtype on the same device (``_plain``: dense masked attention, products in
# the dtype, softmax in float32) against the same oracle, plus the roundings that the plain one does
# not make. FACTOR is flash-attn's: a fused kernel sums in another order and rounds at other points
# than the plain products, and is held to twice their error. float64 is held to 1e-10 of the scale.
FACTOR = 2


def _bound(dtype, scale: float, plain_err: float, roundings: int) -> float:
    """``FACTOR * plain_err`` plus ``roundings`` roundings to ``dtype``, each at most u = eps / 2 of the
    data's ``scale``; in float64, 1e-10 of that scale."""
    scale = max(1.0, scale)
    if dtype == torch.float64:
        return 1e-10 * scale
    return FACTOR * plain_err + roundings * torch.finfo(dtype).eps / 2 * scale


def _lse_bound(dtype, ref_lse: torch.Tensor, plain_err: float) -> float:
    """Log-sum-exps are float32 on every path: the plain one's error (its scores rounded to ``dtype``),
    twice, plus 4 float32 roundings of the largest |lse| (the merges' max, exp, sum and log)."""
    if dtype == torch.float64:
        return 1e-10 * max(1.0, ref_lse.abs().max().item())
    return FACTOR * plain_err + 4 * torch.finfo(torch.float32).eps * ref_lse.abs().max().item()


def _qkv(total: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(2, h, total, 64, generator=gen, dtype=torch.float64)  # noqa: E731
    return mk(8), mk(2), mk(2), mk(8)


def _err(a, b) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def _plain(q, k, v, g, mask, device, dtype):
    """The plain implementation in ``dtype`` on ``device``: ``(out, lse, (dq, dk, dv))`` of dense
    attention under ``mask`` and of ``sum(out * g)``."""
    xs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    groups = q.shape[1] // k.shape[1]
    ke, ve = (t.repeat_interleave(groups, 1) for t in xs[1:])
    s = (xs[0] @ ke.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask.to(device), float("-inf"))
    out = torch.softmax(s, dim=-1).to(dtype) @ ve
    grads = torch.autograd.grad((out * g.to(device, dtype)).sum(), xs)
    return out.detach(), torch.logsumexp(s, dim=-1).detach(), grads


def check_ring(group, device, dtype) -> list[tuple[str, float, float]]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    length = 97 * world + 13
    q, k, v, g = _qkv(length)
    layout = RingLayout(length, world, rank)
    xs = [layout.shard(t, 2).to(device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(*xs, layout, group=group)
    (out * layout.shard(g, 2).to(device, dtype)).sum().backward()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref, causal)
    grads = torch.autograd.grad((ref_out * g).sum(), ref)
    p_out, p_lse, p_grads = _plain(q, k, v, g, causal, device, dtype)
    rows = layout.positions()
    # an output row averages its parts' outputs (each rounded once, weights summing to 1, every one an
    # average of rows of v): one more rounding than the plain one's, at v's scale; a gradient row sums
    # up to 2N parts' results (2N chunks), each rounded once
    vmax = v.abs().max().item()
    found = [("ring out", _err(out, ref_out[:, :, rows]),
              _bound(dtype, vmax, _err(p_out[:, :, rows], ref_out[:, :, rows]), 1)),
             ("ring lse", _err(lse, ref_lse[:, :, rows]),
              _lse_bound(dtype, ref_lse, _err(p_lse[:, :, rows], ref_lse[:, :, rows])))]
    for name, x, grad, p in zip("qkv", xs, grads, p_grads):  # dk, dv of this rank's rows hold every rank's share
        found.append((f"ring d{name}", _err(x.grad, grad[:, :, rows]),
                      _bound(dtype, grad.abs().max().item(), _err(p[:, :, rows], grad[:, :, rows]), 2 * world)))
    return found


def check_star(group, device, dtype, anchor_source: str) -> list[tuple[str, float, float]]:
    """Both phases with autograd: this rank's phase-1 rows (its blocks, behind the anchor's keys) and
    the query's phase-2 rows, loss ``sum(out * g)`` over the context rows and, counted on the query
    host alone (weight 0 elsewhere, as training does), the query rows. Outputs against the oracle on
    every rank; gradients summed over the ranks at their token positions (an anchor recomputed on a
    host gets its share there; a broadcast anchor's gradient returns to its owner) against the
    oracle's, also on every rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lc, lq, block, anchor = 61 * world + 7, 5, 61, 29
    q, k, v, g = _qkv(lc + lq, seed=1)
    layout = BlockLayout(lc, block, anchor, world, rank)
    recompute = anchor_source == "recompute"
    start, end = layout.token_range
    rows = list(range(layout.anchor_rows(recompute))) + list(range(start, end))
    x1 = [t[:, :, rows].to(device, dtype).requires_grad_() for t in (q, k, v)]
    out1, _ = phase1_attention(*x1, layout, group=group, anchor_source=anchor_source)
    own = len(rows) - (end - start)
    x2 = [q[:, :, lc:].to(device, dtype).requires_grad_()]
    if layout.is_query_host:
        x2 += [t[:, :, lc:].to(device, dtype).requires_grad_() for t in (k, v)]
    out2, _ = phase2_attention(x2[0], x1[1][:, :, own:], x1[2][:, :, own:], group=group,
                               query_k=x2[1] if len(x2) > 1 else None, query_v=x2[2] if len(x2) > 1 else None)
    weight = 1.0 if layout.is_query_host else 0.0
    loss = (out1[:, :, own:] * g[:, :, start:end].to(device, dtype)).sum() + \
        weight * (out2 * g[:, :, lc:].to(device, dtype)).sum()
    loss.backward()
    mask = star_mask(lc, block, anchor, lq)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*ref, mask)
    ref_grads = torch.autograd.grad((ref_out * g).sum(), ref)
    plain, _, plain_grads = _plain(q, k, v, g, mask, device, dtype)
    # each row averages its parts' outputs (anchor and own block; hosts), every one an average of rows
    # of v: one more rounding than the plain one's, at v's scale
    vmax = v.abs().max().item()
    phase1 = (0.0, 0.0)
    if end > start:
        phase1 = (_err(out1[:, :, own:], ref_out[:, :, start:end]),
                  _bound(dtype, vmax, _err(plain[:, :, start:end], ref_out[:, :, start:end]), 1))
    found = [(f"star {anchor_source} phase 1", *phase1),
             (f"star {anchor_source} phase 2", _err(out2, ref_out[:, :, lc:]),
              _bound(dtype, vmax, _err(plain[:, :, lc:], ref_out[:, :, lc:]), 1))]
    for i, name in enumerate("qkv"):  # this rank's gradients at their positions, summed over the ranks
        full = torch.zeros(q.shape if i == 0 else k.shape, dtype=torch.float64, device=device)
        full[:, :, rows] += x1[i].grad.double()
        if i == 0 or layout.is_query_host:
            full[:, :, lc:] += x2[i].grad.double()
        dist.all_reduce(full, group=group)
        # a gradient row sums the parts' results of every host (anchor, own block, query keys), each
        # rounded once, and the ranks' shares: 2 roundings per host
        found.append((f"star {anchor_source} d{name}", _err(full, ref_grads[i]),
                      _bound(dtype, ref_grads[i].abs().max().item(), _err(plain_grads[i], ref_grads[i]), 2 * world)))
    return found


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


def _train_loss_dense(model, ctx, tgt, labels, block, anchor):
    """The plain model under the dense ``M_star`` mask (its own dtype and device): the training loss
    of ``star_train_loss`` with context_loss_weight 0.5."""
    import torch.nn.functional as F

    ids = torch.cat([ctx, tgt], dim=1)
    lc, total = ctx.shape[1], ids.shape[1]
    dtype = next(model.parameters()).dtype
    keep = star_mask(lc, block, anchor, total - lc, device=ids.device)
    mask = torch.zeros(total, total, dtype=dtype, device=ids.device).masked_fill(~keep, float("-inf"))
    logits = model(ids, attention_mask=mask[None, None].expand(ids.shape[0], 1, total, total)).logits
    logits = logits.float() if dtype != torch.float64 else logits
    loss = F.cross_entropy(logits[:, lc - 1: total - 1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss + 0.5 * F.cross_entropy(logits[:, : lc - 1].flatten(0, 1), ctx[:, 1:].flatten())


def check_training(group, device, dtype) -> list[tuple[str, float, float]]:
    """``star_train_loss`` + ``reduce_gradients`` across the group: every parameter gradient (norm-wise
    relative error) against the float64 oracle on the CPU, within twice the plain model's error in
    the same dtype on this device plus 4 eps (float64, with RMSNorm in float64 too: 1e-10)."""
    import copy

    from star_sp.testing import build, exact_norms
    from star_sp.training import reduce_gradients, star_train_loss

    def copy_in(model, dtype):  # float64 runs keep their norms in float64 too (the oracle's precision)
        out = copy.deepcopy(model).to(device=device, dtype=dtype)
        return exact_norms(out) if dtype == torch.float64 else out

    world = dist.get_world_size(group)
    base, _ = build("llama", dtype=torch.float64, head_dim=16)
    gen = torch.Generator().manual_seed(5)
    vocab = base.config.vocab_size
    ctx = torch.randint(4, vocab, (2, 37 * world + 5), generator=gen)
    tgt = torch.randint(4, vocab, (2, 9), generator=gen)
    labels = tgt.clone()
    labels[:, ::4] = -100
    block, anchor = 37, 11

    def grads(model, loss):
        names = [n for n, _ in model.named_parameters()]
        return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))

    oracle = exact_norms(copy.deepcopy(base))
    oracle.set_attn_implementation("sdpa")
    ref = grads(oracle, _train_loss_dense(oracle, ctx, tgt, labels, block, anchor))
    plain = copy_in(base, dtype)
    plain.set_attn_implementation("sdpa")
    plain_grads = grads(plain, _train_loss_dense(plain, ctx.to(device), tgt.to(device), labels.to(device), block,
                                                 anchor))
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()  # noqa: E731
    found = []
    for source in ("broadcast", "recompute"):
        model = copy_in(base, dtype)
        cfg = StarConfig(block_size=block, anchor_size=anchor, anchor_source=source)
        star_train_loss(model, ctx.to(device), tgt.to(device), labels.to(device), cfg, group,
                        context_loss_weight=0.5).backward()
        reduce_gradients(model, group)
        worst = max(((rel(p.grad, ref[n]), 2 * rel(plain_grads[n], ref[n]) + 4 * torch.finfo(dtype).eps)
                     for n, p in model.named_parameters()), key=lambda eb: eb[0] - eb[1])
        bound = 1e-10 if dtype == torch.float64 else worst[1]
        found.append((f"training {source}: worst parameter gradient", worst[0], bound))
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
                check_star(group, device, dtype, "recompute") + check_training(group, device, dtype):
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
