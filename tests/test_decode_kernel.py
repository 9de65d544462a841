"""``ops/decode_kernel.py``: one decode step's attention over ``[context | own valid keys]`` in one
split-KV pass, against the float64 oracle (a dense softmax over the concatenated keys).

Without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU),
which checks their indexing, masks and the split merge exactly; with CUDA they run compiled. Skipped
where triton is not installed (the CPU test extra does not pull it: about 290 MB). float64: both sides
differ only in the order of the sums, so ``common.oracle_bound``'s 1e-10 of the scale; float32: twice
the plain float32 implementation's error plus 4 eps (``oracle_bound``).
"""

from __future__ import annotations

import os

import pytest
import torch

from common import oracle_bound

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported (conftest sets it too)
pytest.importorskip("triton", reason="triton is not installed (pip install triton; the GPU machine has it)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(q, ctx_k, ctx_v, own_k, own_v, valid, scale):
    """Softmax over the context keys and the valid own keys, in q's dtype (float64 for the oracle)."""
    batch, heads = q.shape[:2]
    parts_k, parts_v, keep = [], [], []
    if ctx_k is not None:
        parts_k.append(ctx_k.expand(batch, -1, -1, -1))
        parts_v.append(ctx_v.expand(batch, -1, -1, -1))
        keep.append(torch.ones(batch, ctx_k.shape[2], dtype=torch.bool, device=q.device))
    if own_k is not None:
        parts_k.append(own_k)
        parts_v.append(own_v)
        keep.append(valid.expand(batch, -1) if valid.dim() == 1 else valid)
    group = heads // parts_k[0].shape[1]
    k = torch.cat(parts_k, 2).to(q.dtype).repeat_interleave(group, 1)
    v = torch.cat(parts_v, 2).to(q.dtype).repeat_interleave(group, 1)
    keep = torch.cat(keep, 1)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    v = torch.where(keep.transpose(-1, -2), v, 0.0)  # unwritten own slots may hold NaN
    return p @ v, lse


CASES = [  # batch, heads, kv heads, rows, head dim, context keys, own slots, context batch, splits
    (2, 4, 2, 1, 59, 37, 9, 2, None),   # a decode step, GQA 2, odd head dim
    (1, 8, 2, 3, 64, 200, 16, 1, 3),    # three question rows, splits that straddle the context's end
    (3, 4, 4, 2, 32, 0, 12, 3, None),   # no context keys (an idle host's own KV only)
    (2, 6, 2, 1, 40, 50, 0, 2, 2),      # no own keys (a host without the query KV)
    (4, 4, 2, 1, 64, 90, 8, 1, 5),      # one context shared by four sequences (several questions)
]


def _inputs(case, dtype, seed=0):
    batch, heads, kv, rows, dim, lc, cap, ctx_batch, _ = case
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q = r(batch, heads, rows, dim)
    ctx = (r(ctx_batch, kv, lc, dim), r(ctx_batch, kv, lc, dim)) if lc else (None, None)
    own, valid = (None, None), None
    if cap:
        valid = torch.rand(batch, cap, generator=gen) < 0.6
        valid[0] = False  # sequence 0 has no own key yet
        k, v = r(batch, kv, cap, dim), r(batch, kv, cap, dim)
        hole = ~valid[:, None, :, None].expand_as(k)
        k[hole], v[hole] = float("nan"), float("nan")  # unwritten slots
        own = (k, v)
    move = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return (move(q), move(ctx[0]), move(ctx[1]), move(own[0]), move(own[1]),
            None if valid is None else valid.to(DEVICE))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_kv_decode_equals_the_float64_oracle(case, dtype):
    from star_sp.ops.decode_kernel import split_kv_decode

    scale = case[4] ** -0.5
    args = _inputs(case, dtype)
    out, lse = split_kv_decode(*args, scale, splits=case[-1])
    wide = _inputs(case, torch.float64)
    ref_out, ref_lse = oracle(*wide, scale)
    plain_out, plain_lse = oracle(*args, scale)  # the plain implementation of the same math in dtype
    assert out.dtype == dtype and lse.shape == ref_lse.shape
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # rows without keys: lse -inf, out 0
    assert (out[~finite] == 0).all()
    bound = oracle_bound(ref_out, plain_out.double(), dtype)
    assert (out.double() - ref_out).abs().max() <= bound
    lse_bound = oracle_bound(ref_lse[finite], plain_lse.double()[finite], dtype)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= lse_bound


def test_the_split_merge_is_not_vacuous():
    """Dropping one run of keys (what a merge that skipped a split would give) lies outside the bound."""
    from star_sp.ops.decode_kernel import split_kv_decode

    case = CASES[1]
    q, ck, cv, ok, ov, valid = _inputs(case, torch.float64)
    out, _ = split_kv_decode(q, ck, cv, ok, ov, valid, 0.125, splits=3)
    ref, _ = oracle(q, ck, cv, ok, ov, valid, 0.125)
    partial, _ = oracle(q, ck[:, :, 64:], cv[:, :, 64:], ok, ov, valid, 0.125)
    bound = oracle_bound(ref, None, torch.float64)
    assert (out - ref).abs().max() <= bound < (partial - ref).abs().max()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_engine_decodes_through_the_kernel_as_the_oracle(cluster, world_size):
    """``StarConfig(decode_kernel="triton")`` with the fixed-shape decode step (``decode_graphs="static"``,
    the step a CUDA graph captures): every layer of every step goes through the kernel on the ranks with
    keys (at 3 ranks one holds none), and the greedy tokens are the float64 oracle's."""
    import workers
    from model_oracle import oracle_greedy, reference_model

    from star_sp.testing import build

    spec = dict(family="qwen3", block=5, anchor=2, lc=9, lq=3, batch=2, steps=4, anchor_source="broadcast",
                decode_graphs="static", decode_kernel="triton")
    results = cluster(world_size).run(workers.engine_run, spec) if world_size > 1 else [workers.engine_run(None, spec)]
    model, _ = build("qwen3", dtype=torch.float64)
    ctx, q = workers.engine_inputs(spec, model.config.vocab_size)
    greedy = oracle_greedy(reference_model(model), ctx, q, 5, 2, 4)
    layers = model.config.num_hidden_layers
    assert world_size < 3 or any(r["local_tokens"] == 0 for r in results)  # 2 blocks on 3 ranks: one idle
    for r in results:
        assert r["decode_mode"] == "static" and torch.equal(r["greedy"], greedy), r["greedy"]
        if r["local_tokens"] == 0 and not r["query_kv"]:  # no key at all: its part is empty, no kernel
            assert r["kernel_calls"] == 0, r["kernel_calls"]
        else:  # every layer of each decode step after the first token (the query's, through QueryPass)
            assert r["kernel_calls"] >= layers * (spec["steps"] - 1), r["kernel_calls"]


def test_the_kernel_choice_is_checked():
    from star_sp import StarConfig, StarInputError

    with pytest.raises(StarInputError, match="decode_kernel must be one of"):
        StarConfig(block_size=8, decode_kernel="cuda")


def test_keys_in_the_models_layout_and_all_valid_slots():
    """The context's KV as transformers keeps it (a transposed view of ``(B, L, Hkv, D)``) is read in
    place, and ``own_valid=None`` means every own slot holds a key."""
    from star_sp.ops.decode_kernel import split_kv_decode

    gen = torch.Generator().manual_seed(4)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    q = r(2, 4, 1, 32)
    ck, cv = r(2, 70, 2, 32).transpose(1, 2), r(2, 70, 2, 32).transpose(1, 2)
    ok, ov = r(2, 2, 6, 32), r(2, 2, 6, 32)
    assert not ck.is_contiguous() and ck.stride(-1) == 1
    out, lse = split_kv_decode(q, ck, cv, ok, ov, None, 0.2, splits=3)
    ref, ref_lse = oracle(q, ck, cv, ok, ov, torch.ones(2, 6, dtype=torch.bool, device=DEVICE), 0.2)
    bound = oracle_bound(ref, None, torch.float64)
    assert (out - ref).abs().max() <= bound and (lse - ref_lse).abs().max() <= oracle_bound(ref_lse, None, torch.float64)


@pytest.mark.parametrize("world_size", [1, 2])
def test_several_questions_decode_through_the_kernel_as_each_alone_under_the_oracle(cluster, world_size):
    """Three left-padded questions of different lengths over one context (batch 1): the kernel reads the
    shared context for every question's rows and each question's own keys past its padding; each
    question's greedy tokens are the oracle's for [context ; question]."""
    import workers
    from model_oracle import oracle_greedy, reference_model

    from star_sp.testing import build

    spec = dict(family="llama", block=16, anchor=5, lc=45, lengths=[2, 6, 3], listed=True, steps=4,
                decode_graphs="static", decode_kernel="triton")
    results = ([workers.questions_run(None, spec)] if world_size == 1
               else cluster(world_size).run(workers.questions_run, spec))
    model, _ = build("llama", dtype=torch.float64)
    ref = reference_model(model)
    for r in results:
        assert r["kernel_calls"] >= model.config.num_hidden_layers * (spec["steps"] - 1), r["kernel_calls"]
        for i, q in enumerate(r["questions"]):
            want = oracle_greedy(ref, r["ctx"], q[None], spec["block"], spec["anchor"], spec["steps"])
            assert torch.equal(r["greedy"][i:i + 1], want), (i, r["greedy"][i], want)


def test_the_kernel_off_cuda_without_the_interpreter_is_one_line(monkeypatch):
    from star_sp import StarConfig, StarEngine, StarInputError
    from star_sp.testing import build

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the kernel runs compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine outside the tests
    model, _ = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=8, decode_graphs="static", decode_kernel="triton"))
    context = engine.prefill(torch.randint(4, 100, (1, 20)))
    with pytest.raises(StarInputError, match="decode_kernel='triton' runs on CUDA devices, not cpu; use "
                                             "decode_kernel='torch'"):
        engine.generate(context, torch.randint(4, 100, (1, 3)), 3)
