"""Star Attention in one process (block-sparse prefill + phase 2) against the float64 oracle."""

import pytest
import torch

from common import (Case, assert_close_to_oracle, check_phase1_alignment, make_qkv, oracle, plain_lowp,
                    plain_model_logits)
from star_sp.ops import phase1_parts, phase2_local, reference_attention, star_attention

CASES = [
    Case(context_len=23, query_len=3, block_size=7, anchor_size=7),       # ragged last block
    Case(context_len=23, query_len=1, block_size=7, anchor_size=3),       # a < b, Lq = 1
    Case(context_len=40, query_len=5, block_size=8, anchor_size=2, kv_heads=1),  # equal blocks (folded), MQA
    Case(context_len=9, query_len=4, block_size=9, anchor_size=9, heads=3, kv_heads=3),  # one block
    Case(context_len=17, query_len=2, block_size=1, anchor_size=1, head_dim=16),  # block of one token
    Case(context_len=50, query_len=6, block_size=13, anchor_size=13, batch=1, head_dim=64),
    Case(context_len=26, query_len=2, block_size=6, anchor_size=0),        # no anchor (ablation)
]


def _run(case: Case):
    q, k, v, g = make_qkv(case)
    q_, k_, v_ = (t.to(case.dtype).requires_grad_() for t in (q, k, v))
    out, lse = star_attention(q_, k_, v_, context_len=case.context_len, block_size=case.block_size,
                              anchor_size=case.anchor_size, backend=case.backend)
    grads = torch.autograd.grad((out * g.to(case.dtype)).sum(), (q_, k_, v_))
    return (q, k, v, g), out.detach(), lse.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_star_attention_matches_oracle_float64(case, backend):
    case = case.but(backend=backend)
    (q, k, v, g), out, lse, grads = _run(case)
    ref_out, ref_lse, ref_grads = oracle(case, q, k, v, g)
    assert_close_to_oracle("out", out, ref_out, None, torch.float64)
    assert_close_to_oracle("lse", lse, ref_lse, None, torch.float64)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close_to_oracle(f"d{name}", a, b, None, torch.float64)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_star_attention_low_precision_within_plain_error(case, dtype):
    case = case.but(dtype=dtype, backend="cpu")
    (q, k, v, g), out, _, grads = _run(case)
    ref_out, _, ref_grads = oracle(case, q, k, v, g)
    plain_out, plain_grads = plain_lowp(case, q, k, v, g)
    assert_close_to_oracle("out", out, ref_out, plain_out, dtype)
    for name, a, b, p in zip("qkv", grads, ref_grads, plain_grads):
        assert_close_to_oracle(f"d{name}", a, b, p, dtype)


@pytest.mark.parametrize("block_size", [30, 31, 100])
def test_block_at_least_context_is_plain_causal(block_size):
    case = Case(context_len=30, query_len=4, block_size=block_size, anchor_size=5)
    q, k, v, _ = make_qkv(case)
    out, lse = star_attention(q, k, v, context_len=30, block_size=block_size, anchor_size=5)
    causal = torch.ones(34, 34, dtype=torch.bool).tril()
    ref_out, ref_lse = reference_attention(q, k, v, causal)
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)


def test_star_differs_from_causal_when_blocks_are_small():
    """Guards the oracle comparisons above against a mask that degenerated to plain causal."""
    case = Case(context_len=30, query_len=4, block_size=6, anchor_size=2)
    q, k, v, _ = make_qkv(case)
    out, _ = star_attention(q, k, v, context_len=30, block_size=6, anchor_size=2)
    causal = reference_attention(q, k, v, torch.ones(34, 34, dtype=torch.bool).tril())[0]
    assert (out[:, :, 6:30] - causal[:, :, 6:30]).abs().max() > 0.1
    assert torch.allclose(out[:, :, :6], causal[:, :, :6], atol=1e-12)  # block 0 is causal either way


def test_equal_blocks_share_one_folded_call():
    k = v = torch.zeros(1, 1, 26, 4)
    parts = phase1_parts(k, v, [6, 6, 6, 6, 2], has_block0=True, anchor_len=3)
    # block 0, three equal blocks in one call, the ragged block, then the anchor for all later rows
    # (last, so that a broadcast anchor can still be in flight while the blocks' own parts run)
    assert [(p.row_start, p.row_end, p.causal, p.fold) for p in parts] == [
        (0, 6, True, 1), (6, 24, True, 3), (24, 26, True, 1), (6, 26, False, 1)]
    assert parts[3].k.shape[2] == 3


@pytest.mark.parametrize("query_len, cached", [(1, 0), (4, 0), (1, 5), (3, 2)])
def test_phase2_local_matches_oracle_rows(query_len, cached):
    """Query rows over the whole context plus a cache of earlier query/generated tokens."""
    case = Case(context_len=19, query_len=cached + query_len, block_size=5, anchor_size=2)
    q, k, v, _ = make_qkv(case)
    lc, total = case.context_len, case.total
    out, lse = phase2_local(q[:, :, total - query_len:], k[:, :, :lc], v[:, :, :lc], k[:, :, lc:], v[:, :, lc:])
    ref_out, ref_lse, _ = oracle(case, q, k, v, torch.zeros_like(q))
    assert torch.allclose(out, ref_out[:, :, total - query_len:], atol=1e-12)
    assert torch.allclose(lse, ref_lse[:, :, total - query_len:], atol=1e-12)


@pytest.mark.parametrize("kw, words", [
    (dict(block_size=4, anchor_size=6), "must not exceed"),
    (dict(block_size=4, anchor_size=-1), "anchor_size must be a non-negative integer"),
    (dict(block_size=0, anchor_size=1), "block_size must be a positive integer"),
    (dict(block_size=4, anchor_size=2, context_len=0), "context_len must be an integer"),
])
def test_star_attention_rejects_bad_sizes(kw, words):
    from star_sp import StarInputError

    q, k, v, _ = make_qkv(Case(context_len=10, query_len=2, block_size=4, anchor_size=2))
    args = {"context_len": 10, **kw}
    with pytest.raises(StarInputError, match=words):
        star_attention(q, k, v, **args)


def test_parts_reject_bad_shapes():
    from star_sp import StarInputError
    from star_sp.ops import Part

    k = torch.zeros(1, 1, 6, 4)
    with pytest.raises(StarInputError, match="at least as many keys as rows"):
        Part(0, 6, k[:, :, :4], k[:, :, :4], causal=True)
    with pytest.raises(StarInputError, match="needs rows and keys"):
        Part(0, 4, k[:, :, :0], k[:, :, :0])
    with pytest.raises(StarInputError, match="must divide"):
        Part(0, 6, k, k, causal=True, fold=4)


def test_kernels_report_their_causal_alignment():
    """The probe tells a bottom-right kernel (math) from a top-left one (aten's CPU flash kernel)."""
    from star_sp.ops import KERNELS

    assert KERNELS["math"].bottom_right_causal(torch.device("cpu"), torch.float64)
    assert KERNELS["math"].bottom_right_causal(torch.device("cpu"), torch.float32)
    assert not KERNELS["cpu"].bottom_right_causal(torch.device("cpu"), torch.float32)


def test_non_square_causal_part_refused_by_a_top_left_kernel():
    from star_sp import StarInputError
    from star_sp.ops import KERNELS, Part, parts_attention

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8)
    with pytest.raises(StarInputError, match="does not align a causal mask bottom-right"):
        parts_attention(q, [Part(0, 4, k, k, causal=True)], KERNELS["cpu"], 0.3)
    out, lse = parts_attention(q.double(), [Part(0, 4, k.double(), k.double(), causal=True)], KERNELS["math"], 0.3)
    mask = torch.ones(4, 9, dtype=torch.bool).tril(5)
    ref_out, ref_lse = reference_attention(q.double(), k.double(), k.double(), mask, scale=0.3)
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)


@pytest.mark.parametrize("lengths, anchor", [([7, 7, 7, 2], 7), ([7, 7, 7, 2], 3), ([5, 5, 5], 1), ([9, 4], 4)])
@pytest.mark.parametrize("batch, heads, kv_heads", [(2, 4, 2), (1, 3, 1)])
def test_fused_anchor_parts_match_the_split_form_and_the_oracle(lengths, anchor, batch, heads, kv_heads):
    """``fuse_anchor=True``: each later block attends [anchor ; block] in one bottom-right causal call
    (runs of equal blocks folded); same result as the split form and the float64 oracle, with the
    output kept in the input dtype (no row is merged)."""
    from star_sp.ops import local_attention

    n = sum(lengths)
    case = Case(context_len=n, query_len=0, block_size=lengths[0], anchor_size=anchor, batch=batch, heads=heads,
                kv_heads=kv_heads)
    q, k, v, g = make_qkv(case)
    fused = phase1_parts(k, v, lengths, has_block0=True, anchor_len=anchor, fuse_anchor=True)
    assert all(p.causal for p in fused)
    for p in fused[1:]:  # each folded chunk of keys is [anchor ; block]
        assert p.k.shape[2] // p.fold == anchor + (p.row_end - p.row_start) // p.fold
    split = phase1_parts(k, v, lengths, has_block0=True, anchor_len=anchor)
    out_f, lse_f = local_attention(q, fused, scale=None, backend="math")
    out_s, lse_s = local_attention(q, split, scale=None, backend="math")
    ref_out, ref_lse, _ = oracle(case, q, k, v, g)
    assert (out_f - ref_out).abs().max() < 1e-12 and (lse_f - ref_lse).abs().max() < 1e-12
    assert (out_f - out_s).abs().max() < 1e-12
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out32, _ = local_attention(q32, phase1_parts(k32, v32, lengths, has_block0=True, anchor_len=anchor,
                                                 fuse_anchor=True), scale=None, backend="math")
    assert out32.dtype == torch.float32 and (out32.double() - ref_out).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phase1_causal_alignment_on_cpu(backend, dtype):
    """The GPU test's check (``common.check_phase1_alignment``) on the CPU kernels, one of each alignment:
    the probe tells what the kernel does, the split form is exact, the fused form is taken (math) or
    refused with one clear error (aten's CPU kernel, top-left)."""
    check_phase1_alignment("cpu", backend, dtype)


def test_fusion_is_chosen_only_without_gradients_and_with_a_bottom_right_kernel():
    from star_sp.ops.star import can_fuse_anchor

    q, k, v, _ = make_qkv(Case(context_len=29, query_len=0, block_size=8, anchor_size=5))
    assert can_fuse_anchor(q, k, v, "math") and not can_fuse_anchor(q, k, v, "cpu")
    assert not can_fuse_anchor(q.clone().requires_grad_(), k, v, "math")
    with torch.no_grad():
        assert can_fuse_anchor(q.clone().requires_grad_(), k, v, "math")


def test_fused_and_split_prefill_give_the_same_model_outputs(tmp_path):
    """The engine's one-process Star prefill with the math kernel (fused form) and with aten's CPU kernel
    (split form), through a real transformers model in float32: both within the plain float32 model's
    error (dense ``M_star`` mask, ``common.plain_model_logits``) of the float64 model-level oracle."""
    from model_oracle import oracle_logits, reference_model
    from star_sp import StarConfig, StarEngine
    from star_sp.testing import save

    from transformers import AutoModelForCausalLM

    save(tmp_path / "m", "llama", tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").float().eval()
    ids = torch.randint(4, model.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    context, query = ids[:, :-3], ids[:, -3:]
    ref = oracle_logits(reference_model(model), context, query, 11, 4)
    plain = plain_model_logits(model, context, query, 11, 4)
    for backend in ("math", "cpu"):
        engine = StarEngine(model, StarConfig(block_size=11, anchor_size=4, backend=backend))
        assert_close_to_oracle(f"{backend} logits", engine.score(engine.prefill(context), query), ref, plain,
                               torch.float32)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
def test_many_questions_over_one_context_fold_heads_into_rows(heads, kv_heads, monkeypatch):
    """Q questions of L rows over one context: each question's output and LSE equal the float64 oracle
    of that question alone, and the kernel is called once, over the context's KV heads (the query heads
    that share a KV head fold into rows, so the KV is read once for all of them)."""
    from star_sp.ops import parts as parts_mod
    from star_sp.ops.star import shared_context_attention

    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    n, rows, ctx, d = 3, 2, 11, 8
    q = torch.randn(n, heads, rows, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, ctx, d, generator=g, dtype=torch.float64) for _ in range(2))
    calls = []
    real = parts_mod.parts_attention

    def spy(q_, parts, *a, **kw):
        calls.append(tuple(q_.shape))
        return real(q_, parts, *a, **kw)

    monkeypatch.setattr("star_sp.ops.star.parts_attention", spy)
    out, lse = shared_context_attention(q, k, v)
    assert calls == [(1, kv_heads, heads // kv_heads * n * rows, d)]
    for i in range(n):
        ref_out, ref_lse = reference_attention(q[i:i + 1], k, v)
        torch.testing.assert_close(out[i:i + 1], ref_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[i:i + 1], ref_lse, rtol=0, atol=1e-12)
