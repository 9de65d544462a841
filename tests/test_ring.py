"""Exact ring attention (the baseline mode) across N gloo processes against the float64 oracle:
outputs, log-sum-exps and gradients (also through the log-sum-exp) assembled from every rank equal
plain causal attention over the whole sequence."""

import pytest
import torch

import workers
from common import Case, make_qkv
from test_distributed import _errors_on_every_rank
from star_sp import StarInputError
from star_sp.layout import RingLayout
from star_sp.ops import reference_attention


def _oracle(length, seed, lse_grad):
    case = Case(context_len=length, query_len=0, block_size=length, anchor_size=0, seed=seed)
    q, k, v, g = (t.requires_grad_() if i < 3 else t for i, t in enumerate(make_qkv(case)))
    gl = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    out, lse = reference_attention(q, k, v, mask)
    loss = (out * g).sum() + ((lse * gl).sum() if lse_grad else 0)
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


def test_zigzag_layout_covers_every_token_once_and_balances_the_work():
    for length in range(8, 60, 7):
        for world in (1, 2, 3, 4):
            rows = [RingLayout(length, world, r).positions().tolist() for r in range(world)]
            assert sorted(sum(rows, [])) == list(range(length))
            # causal work of rank r: sum over its rows of (position + 1); balanced within a few rows
            work = [sum(p + 1 for p in rs) for rs in rows]
            assert max(work) - min(work) <= 2 * length, (length, world, work)
    layout = RingLayout(10, 2, 1)
    assert layout.positions().tolist() == [2, 3, 4, 5, 6] and layout.shard(torch.arange(10), 0).tolist() == [2, 3, 4, 5, 6]
    with pytest.raises(StarInputError, match="rank must be in \\[0, 2\\), got 2"):
        RingLayout(10, 2, 2)
    with pytest.raises(StarInputError, match="needs at least 8 tokens"):
        RingLayout(7, 4, 0)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length, lse_grad", [(37, False), (50, True), (8, True)])
def test_ring_attention_matches_the_oracle(cluster, world_size, length, lse_grad):
    results = cluster(world_size).run(workers.ring_layer, length, torch.float64, lse_grad)
    ref_out, ref_lse, ref_grads = _oracle(length, 0, lse_grad)
    got = {name: torch.zeros_like(ref) for name, ref in
           (("out", ref_out), ("lse", ref_lse), ("dq", ref_grads[0]), ("dk", ref_grads[1]), ("dv", ref_grads[2]))}
    for r in results:
        for name in got:
            got[name][:, :, r["rows"]] = r[name].double()
    assert sorted(i for r in results for i in r["rows"]) == list(range(length))
    for name, ref in (("out", ref_out), ("lse", ref_lse), ("dq", ref_grads[0]), ("dk", ref_grads[1]),
                      ("dv", ref_grads[2])):
        err = (got[name] - ref).abs().max().item()
        assert err <= 1e-10 * max(1.0, ref.abs().max().item()), f"{name}: error {err:.3g} at N={world_size}"


@pytest.mark.slow
def test_ring_attention_in_float32_and_its_errors(cluster):
    results = cluster(3).run(workers.ring_layer, 41, torch.float32, False)
    ref_out = _oracle(41, 0, False)[0]
    for r in results:
        err = (r["out"].double() - ref_out[:, :, r["rows"]]).abs().max().item()
        assert err < 1e-5, err
    raw = cluster(3).run_raw(workers.ring_layer, 5, torch.float64, False)  # fewer than 2 tokens per rank
    _errors_on_every_rank(raw, "needs at least 6 tokens")
