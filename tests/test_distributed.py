"""Phase 1 and phase 2 across N gloo processes against the float64 oracle.

Each case runs one layer on every rank (``workers.star_layer``); the test assembles the ranks' outputs
and gradients by global row and compares them with dense ``M_star`` attention in float64. A failure
names the case and world size; the merge alone is localized by ``test_merge.py``, the one-process math
by ``test_star_local.py``.
"""

import pytest
import torch

import workers
from common import (Case, assert_bound_not_vacuous, assert_close_to_oracle, make_qkv, merge_inputs, oracle,
                    plain_attention_lse, plain_lowp)
from star_sp.ops import reference_attention

CASES = [
    Case(context_len=23, query_len=3, block_size=5, anchor_size=5),              # ragged last block
    Case(context_len=29, query_len=2, block_size=6, anchor_size=2, kv_heads=1),   # a < b, MQA
    Case(context_len=13, query_len=1, block_size=8, anchor_size=3),               # 2 blocks: idle hosts at N > 2
    Case(context_len=12, query_len=4, block_size=12, anchor_size=12),              # one block: plain causal
    Case(context_len=19, query_len=2, block_size=6, anchor_size=0),                # no anchor (ablation)
]


def _assemble(case, results):
    lc, total = case.context_len, case.total
    out = torch.zeros(case.batch, case.heads, total, case.head_dim, dtype=torch.float64)
    grads = [torch.zeros(case.batch, h, total, case.head_dim, dtype=torch.float64)
             for h in (case.heads, case.kv_heads, case.kv_heads)]
    seen = torch.zeros(total, dtype=torch.long)
    for r in results:
        anchor_rows = r["anchor_rows"]
        for j, i in enumerate(r["rows"]):
            for acc, key in zip(grads, ("dq1", "dk1", "dv1")):
                acc[:, :, i] += r[key][:, :, j].double()
            if j >= anchor_rows:
                out[:, :, i] = r["out1"][:, :, j].double()
                seen[i] += 1
        grads[0][:, :, lc:] += r["dq2"].double()  # each rank's query gradient is its own keys' share
        if r["query_host"]:
            out[:, :, lc:] = r["out2"].double()
            grads[1][:, :, lc:] += r["dkq"].double()
            grads[2][:, :, lc:] += r["dvq"].double()
    assert seen[:lc].tolist() == [1] * lc, "every context token is encoded by exactly one rank"
    return out, grads


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("anchor_source", ["broadcast", "recompute"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_two_phases_match_oracle(cluster, world_size, anchor_source, case):
    case = case.but(anchor_source=anchor_source)
    _assert_layer_matches_oracle(case, cluster(world_size).run(workers.star_layer, case))


def _assert_layer_matches_oracle(case, results):
    """Outputs and gradients assembled from every rank, and each rank's merged phase-2 result, in float64."""
    q, k, v, g = make_qkv(case)
    ref_out, ref_lse, ref_grads = oracle(case, q, k, v, g)
    out, grads = _assemble(case, results)
    assert_close_to_oracle("out", out, ref_out, None, torch.float64)
    for r in results:  # the merged phase-2 result is the same on every rank
        assert_close_to_oracle("out2", r["out2"], ref_out[:, :, case.context_len:], None, torch.float64)
        assert_close_to_oracle("lse2", r["lse2"], ref_lse[:, :, case.context_len:], None, torch.float64)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close_to_oracle(f"d{name}", a, b, None, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_paper_form_allgather_merge_matches_oracle(cluster, world_size):
    """The paper's form (anchor recomputed, outputs and LSE all-gathered) is the same function."""
    case = Case(context_len=23, query_len=3, block_size=5, anchor_size=2, anchor_source="recompute", merge="allgather")
    _assert_layer_matches_oracle(case, cluster(world_size).run(workers.star_layer, case))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_broadcast_and_recompute_agree(cluster, world_size):
    """Both anchor sources, in float32 and without gradients, against the float64 oracle (within the
    plain float32 implementation's error, ``assert_close_to_oracle``); and with each other bit for bit:
    both hand the same kernel the same anchor KV values (given, not recomputed by a model's layers
    here) and the same parts in the same order, so a difference can only be a misplaced row."""
    case = Case(context_len=31, query_len=2, block_size=7, anchor_size=4, dtype=torch.float32)
    q, k, v, g = make_qkv(case)
    ref_out = oracle(case, q, k, v, g)[0]
    plain_out = plain_lowp(case, q, k, v, g)[0]
    lc = case.context_len
    a = cluster(world_size).run(workers.star_layer, case, False)
    b = cluster(world_size).run(workers.star_layer, case.but(anchor_source="recompute"), False)
    for ra, rb in zip(a, b):
        skip = rb["anchor_rows"]  # recompute mode also returns the anchor's rows
        own = slice(ra["rows"][0], ra["rows"][-1] + 1)  # 5 blocks: no rank is idle
        for name, r, out1 in (("broadcast", ra, ra["out1"]), ("recompute", rb, rb["out1"][:, :, skip:])):
            assert_close_to_oracle(f"{name} out1", out1, ref_out[:, :, own], plain_out[:, :, own], case.dtype)
            assert_close_to_oracle(f"{name} out2", r["out2"], ref_out[:, :, lc:], plain_out[:, :, lc:], case.dtype)
        assert torch.equal(ra["out1"], rb["out1"][:, :, skip:]) and torch.equal(ra["out2"], rb["out2"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_across_ranks_within_plain_error(cluster, dtype):
    """Outputs and gradients in bf16 and float32 on 3 ranks, assembled, against the float64 oracle:
    within twice the plain implementation's error in the same dtype (flash-attn's factor: a fused
    kernel sums in another order and rounds at other points than the plain products) plus
    ``assert_close_to_oracle``'s floor of 4 eps at the data's scale. The floor covers what the plain
    implementation does not do: an anchor key's gradient here is rounded to the dtype up to 7 times
    (4 kernel outputs: block 0's causal part and phase 2 on the anchor's owner, the anchor part on each
    of the 2 other ranks; the owner's float32 sum of the other ranks' shares, rounded once; 2 additions
    by autograd on the leaf) where the plain implementation rounds once: 6 more roundings of at most
    u = eps / 2 of the data's scale each, 3 eps; a query row's gradient is the sum of the 3 ranks'
    shares, each rounded once: 2 more roundings, 1 eps."""
    case = Case(context_len=41, query_len=3, block_size=9, anchor_size=4, dtype=dtype)
    results = cluster(3).run(workers.star_layer, case)
    q, k, v, g = make_qkv(case)
    ref_out, _, ref_grads = oracle(case, q, k, v, g)
    plain_out, plain_grads = plain_lowp(case, q, k, v, g)
    out, grads = _assemble(case, results)
    assert_close_to_oracle("out", out, ref_out, plain_out, dtype)
    for name, a, b, p in zip("qkv", grads, ref_grads, plain_grads):
        assert_close_to_oracle(f"d{name}", a, b, p, dtype)


def _errors_on_every_rank(raw, words):
    assert all(not ok for ok, _ in raw), "every rank must raise"
    for ok, (etype, message, _) in raw:
        assert etype == "StarInputError" and words in message, message
    return [m for _, (_, m, _) in raw]


@pytest.mark.slow
def test_only_query_host_may_hold_query_kv(cluster):
    raw = cluster(3).run_raw(workers.phase2_bad_query_kv, Case(context_len=8, query_len=2, block_size=4, anchor_size=4))
    messages = _errors_on_every_rank(raw, "only the query host")
    assert all("rank(s) [0, 1]" in m for m in messages)


@pytest.mark.slow
def test_ranks_that_disagree_on_config_all_raise(cluster):
    raw = cluster(2).run_raw(workers.phase1_config_mismatch, Case(context_len=20, query_len=1, block_size=5, anchor_size=5))
    _errors_on_every_rank(raw, "ranks disagree on layout")


@pytest.mark.slow
def test_bad_shape_on_one_rank_raises_everywhere(cluster):
    raw = cluster(3).run_raw(workers.phase1_bad_shape_on_one_rank, Case(context_len=20, query_len=1, block_size=5, anchor_size=5))
    messages = _errors_on_every_rank(raw, "rank(s) [2]")
    assert all("must pass" in m for m in messages)


@pytest.mark.slow
def test_dtype_mismatch_raises_everywhere(cluster):
    raw = cluster(2).run_raw(workers.phase2_dtype_mismatch, Case(context_len=10, query_len=2, block_size=5, anchor_size=5))
    _errors_on_every_rank(raw, "ranks disagree on dtype")


@pytest.mark.slow
def test_empty_query_raises_everywhere(cluster):
    raw = cluster(2).run_raw(workers.phase2_empty_query, Case(context_len=10, query_len=2, block_size=5, anchor_size=5))
    _errors_on_every_rank(raw, "the query is empty")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("anchor_source", ["broadcast", "recompute"])
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_fused_phase1_without_gradients_matches_oracle(cluster, world_size, anchor_source, case):
    """Inference with a kernel that aligns causal masks bottom-right (math) takes phase 1's fused form
    (one call over [anchor ; block] per block, the anchor waited for first); outputs match the oracle."""
    case = case.but(anchor_source=anchor_source, backend="math")
    results = cluster(world_size).run(workers.star_layer, case, False)
    q, k, v, g = make_qkv(case)
    ref_out = oracle(case, q, k, v, g)[0]
    for r in results:
        assert_close_to_oracle("out2", r["out2"], ref_out[:, :, case.context_len:], None, torch.float64)
        rows = r["rows"][r["anchor_rows"]:]
        if rows:
            assert_close_to_oracle("out1", r["out1"][:, :, r["anchor_rows"]:], ref_out[:, :, rows[0]:rows[-1] + 1],
                                   None, torch.float64)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_allreduce_merge_matches_oracle(cluster, world_size, dtype):
    """The phase-2 all-reduce merge (``AllReduceMerge``) of every rank's partial attention over its share of
    the keys, against the float64 oracle over all keys (``common.merge_inputs``: rows with keys on some
    ranks only, scores spread so the max shift matters). The partials are the plain implementation in
    ``dtype`` (``plain_attention_lse``), as a kernel's would be. Bounds (``assert_close_to_oracle``):
    float64 within 1e-10; lower precision within twice the error of the plain implementation over all
    keys at once in that dtype, plus 4 eps of the dtype for the output and 4 float32 eps for the
    log-sum-exp (float32 on every low-precision path: the merge's max, exp, sum and log). Not vacuous: a
    merge that drops the last rank's partial lies outside both bounds. A row with keys on no rank stays
    O = 0, lse = -inf."""
    lowp = getattr(torch, dtype)
    lse_dtype = torch.float64 if lowp == torch.float64 else torch.float32
    results = cluster(world_size).run(workers.allreduce_merge, dtype)
    q, k, v, mask, spans = merge_inputs(world_size)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    plain_out, plain_lse = plain_attention_lse(q, k, v, mask, lowp)
    last = spans[-1][0]  # the keys of every rank but the last
    dropped_out, dropped_lse = reference_attention(q, k[:, :, :last], v[:, :, :last], mask[:, :last])
    rows = mask.any(dim=-1)
    assert not rows[5] and rows[:5].all()
    for r in results:
        assert_close_to_oracle("out", r["out"][:, :, rows], ref_out[:, :, rows], plain_out[:, :, rows], lowp)
        assert_close_to_oracle("lse", r["lse"][:, :, rows], ref_lse[:, :, rows], plain_lse[:, :, rows], lse_dtype)
        assert (r["out"][:, :, ~rows] == 0).all() and torch.isneginf(r["lse"][:, :, ~rows]).all()
    assert_bound_not_vacuous("out", dropped_out[:, :, rows], ref_out[:, :, rows], plain_out[:, :, rows], lowp)
    assert_bound_not_vacuous("lse", dropped_lse[:, :, rows], ref_lse[:, :, rows], plain_lse[:, :, rows], lse_dtype)
