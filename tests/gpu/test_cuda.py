"""CUDA kernels and Star Attention on the GPU against the float64 oracle (skipped without CUDA).

Run on a GPU machine with ``bash tools/run_gpu_tests.sh``. Each kernel's error must stay within twice
the error of the plain implementation in the same dtype (the ``math`` backend, on the same GPU).
"""

import pytest
import torch

from common import assert_bound_not_vacuous, assert_close_to_oracle
from star_sp import BackendUnavailableError
from star_sp.ops import attention_with_lse, reference_attention, select_kernel, star_attention, star_mask

pytestmark = pytest.mark.gpu


def _inputs(b, h, hkv, sq, sk, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda hh, s: torch.randn(b, hh, s, d, generator=gen, dtype=torch.float64)  # noqa: E731
    return mk(h, sq), mk(hkv, sk), mk(hkv, sk), mk(h, sq), torch.randn(b, h, sq, generator=gen, dtype=torch.float64)


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _run(backend, dtype, q, k, v, g, gl, causal):
    xs = [t.cuda().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_with_lse(*xs, causal=causal, backend=backend)
    grads = torch.autograd.grad((out * g.cuda().to(dtype)).sum() + (lse * gl.cuda().float()).sum(), xs)
    return out, lse, grads


SHAPES = [  # b, h, hkv, sq, sk, d, causal
    (2, 8, 2, 128, 128, 128, True),
    (1, 4, 4, 37, 300, 64, True),     # bottom-right causal: prefix + square part
    (2, 8, 1, 1, 1000, 128, False),   # a decode row over a long context, MQA
    (1, 6, 2, 200, 200, 96, True),
    (1, 4, 2, 333, 517, 64, False),
]


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cuda_kernel_matches_oracle(backend, dtype, shape):
    b, h, hkv, sq, sk, d, causal = shape
    q, k, v, g, gl = _inputs(b, h, hkv, sq, sk, d)
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else None
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*xs, mask)
    ref_grads = torch.autograd.grad((ref_out * g).sum() + (ref_lse * gl).sum(), xs)
    try:
        out, lse, grads = _run(backend, dtype, q, k, v, g, gl, causal)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    p_out, p_lse, p_grads = _run("math", dtype, q, k, v, g, gl, causal)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _err(out, ref_out) <= 2 * _err(p_out, ref_out) + 4 * eps
    assert _err(lse, ref_lse) <= 2 * _err(p_lse, ref_lse) + 16 * eps
    for a, r, p in zip(grads, ref_grads, p_grads):
        assert _err(a, r) <= 2 * _err(p, r) + 8 * eps * r.abs().max().item()


def test_auto_picks_a_fused_kernel():
    q = torch.randn(1, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    assert select_kernel("auto", q, k).name in ("cudnn", "flash")
    assert select_kernel("auto", q[:, :, :1], k).name == "flash"  # decoding: no per-shape plan
    assert select_kernel("auto", q.float(), k.float()).name == "efficient"
    assert select_kernel("auto", q[..., :59], k[..., :59]).name in ("efficient", "math")
    folded = torch.randn(1, 2, 128, 128, device="cuda", dtype=torch.bfloat16)  # decode questions folded into rows
    assert select_kernel("auto", folded, k[:, :, :1].expand(1, 2, 4096, 128)).name == "flash"  # 2 tiles: split keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", [(1000, 7, 300, 75, 8, 2, 128), (513, 16, 100, 33, 6, 2, 64), (4096, 3, 1024, 256, 8, 8, 128)],
                         ids=str)
def test_star_attention_cuda_matches_oracle(dtype, sizes):
    lc, lq, blk, anc, h, hkv, d = sizes
    q, k, v, g, _ = _inputs(1, h, hkv, lc + lq, lc + lq, d, seed=lc)
    mask = star_mask(lc, blk, anc, lq)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*xs, mask)
    ref_grads = torch.autograd.grad((ref_out * g).sum(), xs)

    def run(backend):
        ys = [t.cuda().to(dtype).requires_grad_() for t in (q, k, v)]
        out, _ = star_attention(*ys, context_len=lc, block_size=blk, anchor_size=anc, backend=backend)
        return out, torch.autograd.grad((out * g.cuda().to(dtype)).sum(), ys)

    out, grads = run("auto")
    p_out, p_grads = run("math")
    eps = torch.finfo(dtype).eps
    assert _err(out, ref_out) <= 2 * _err(p_out, ref_out) + 4 * eps
    for a, r, p in zip(grads, ref_grads, p_grads):
        assert _err(a, r) <= 2 * _err(p, r) + 8 * eps * r.abs().max().item()


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_phase1_causal_alignment(backend, dtype):
    """Each fused kernel's causal alignment, as the probe finds it, is what the kernel does with more keys
    than rows (on an H200 with torch 2.11: flash bottom-right, cuDNN and the memory-efficient kernel
    top-left); phase 1's split form matches the oracle on every kernel; the fused form (one call over
    [anchor ; block] per block) is chosen exactly where the alignment is bottom-right and matches the
    oracle there, and a top-left kernel refuses it with one clear error. Bounds: twice the plain
    implementation's error in the same dtype, plus 4 eps."""
    from common import check_phase1_alignment

    check_phase1_alignment("cuda", backend, dtype)


@pytest.mark.parametrize("acc_dtype", [torch.bfloat16, torch.float32])
def test_fused_merge_matches_the_oracle(acc_dtype):
    """The Triton merge (``ops.merge_fused``) over (B, S, H, D)-laid views, against float64 and against
    the torch form on the same inputs: a bf16 accumulator given two partials is within one rounding of
    the oracle; a float32 one given five (the ring's case, an empty part first) matches it; rows
    without keys stay 0 / -inf even over NaN garbage; and it really ran (not the torch fallback)."""
    from star_sp.ops.merge import merge_into_torch_
    from star_sp.ops.merge_fused import fused_merge_available, merge_into_fused

    assert fused_merge_available(torch.empty(1, device="cuda")), "Triton is missing: the fused merge cannot run"
    gen = torch.Generator().manual_seed(7)
    b, s, h, d = 2, 333, 6, 96
    q = torch.randn(b, h, s, d, dtype=torch.float64, generator=gen) * 20
    k = torch.randn(b, h, 211, d, dtype=torch.float64, generator=gen)
    v = torch.randn(b, h, 211, d, dtype=torch.float64, generator=gen)
    cuts = [0, 120, 211] if acc_dtype == torch.bfloat16 else [0, 0, 50, 90, 150, 211]
    ref_out, ref_lse = reference_attention(q, k, v)
    out_acc = torch.empty(b, s, h, d, dtype=acc_dtype, device="cuda").transpose(1, 2)
    lse_acc = torch.full((b, h, s), float("-inf"), device="cuda")
    torch_out, torch_lse = torch.zeros(b, h, s, d, device="cuda"), lse_acc.clone()
    for i, (c0, c1) in enumerate(zip(cuts, cuts[1:])):
        o, lse = reference_attention(q, k[:, :, c0:c1], v[:, :, c0:c1])
        o = o.to(torch.bfloat16).cuda().transpose(1, 2).contiguous().transpose(1, 2)
        lse = lse.float().cuda()
        if i == 0:
            out_acc.copy_(o), lse_acc.copy_(lse), torch_out.copy_(o), torch_lse.copy_(lse)
        else:
            assert merge_into_fused(out_acc, lse_acc, o, lse)
            merge_into_torch_(torch_out, torch_lse, o, lse)
    size = v.abs().max().item()  # every output, partial or merged, is an average of rows of v
    rounding = torch.finfo(acc_dtype).eps * size
    inputs = torch.finfo(torch.bfloat16).eps * size  # the partials were rounded to bf16
    # both forms carry the float32 error of log-sum-exps this large in their weights
    weights = 4 * torch.finfo(torch.float32).eps * ref_lse.abs().max().item() * size
    assert _err(out_acc, torch_out) <= rounding + weights
    assert _err(out_acc, ref_out) <= inputs + rounding
    # the log-sum-exp is float32 in both forms: within twice the torch form's error (the plain float32
    # merge of the same partials) plus 4 float32 eps at its scale; a merge that dropped the last part
    # lies outside that bound
    assert_close_to_oracle("fused merge lse", lse_acc, ref_lse, torch_lse, torch.float32)
    dropped_lse = reference_attention(q, k[:, :, :cuts[-2]], v[:, :, :cuts[-2]])[1]
    assert_bound_not_vacuous("fused merge lse", dropped_lse, ref_lse, torch_lse, torch.float32)

    # NaN garbage in rows never merged, with keys in neither partial or only in the new one
    acc = torch.full((1, 1, 3, 8), float("nan"), dtype=acc_dtype, device="cuda")
    lacc = torch.full((1, 1, 3), float("-inf"), device="cuda")
    new = torch.randn(1, 1, 3, 8, device="cuda", dtype=torch.bfloat16)
    assert merge_into_fused(acc, lacc, new, torch.tensor([[[float("-inf"), 0.25, float("-inf")]]], device="cuda"))
    assert (acc[0, 0, [0, 2]] == 0).all() and torch.isneginf(lacc[0, 0, [0, 2]]).all() and lacc[0, 0, 1] == 0.25
    assert torch.equal(acc[0, 0, 1], new[0, 0, 1].to(acc_dtype))


def test_float64_merges_keep_their_precision_on_cuda():
    """float64 stays off the float32 Triton kernel: in-place merges on CUDA match the oracle to 1e-12."""
    from star_sp.ops.merge import merge_into_
    from star_sp.ops.merge_fused import merge_into_fused

    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 50, 32, dtype=torch.float64, generator=gen) * 10
    k, v = (torch.randn(1, 4, 90, 32, dtype=torch.float64, generator=gen) for _ in range(2))
    a, b = reference_attention(q, k[:, :, :40], v[:, :, :40]), reference_attention(q, k[:, :, 40:], v[:, :, 40:])
    out, lse = a[0].cuda().clone(), a[1].cuda().clone()
    assert not merge_into_fused(out, lse, b[0].cuda(), b[1].cuda())
    merge_into_(out, lse, b[0].cuda(), b[1].cuda())
    ref_out, ref_lse = reference_attention(q, k, v)
    assert _err(out, ref_out) < 1e-12 and _err(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("sizes", [(40000, 8192, 8192), (33000, 4096, 1024), (5000, 700, 300)], ids=str)
def test_phase1_prefill_layout_of_a_model(sizes):
    """Phase 1 as the engine runs it on one GPU (no gradient; q, k, v in the (B, S, H, D) memory layout
    that a transformers model hands over), bf16, against float64 on a sample of rows; the output comes
    back in q's layout (the model's transpose back is free) and in q's dtype."""
    from star_sp.ops import local_attention, phase1_parts

    lc, blk, anc = sizes
    h, hkv, d = 8, 2, 128
    gen = torch.Generator(device="cuda").manual_seed(lc)
    def mk(heads):  # (B, H, S, D) views of (B, S, H, D) memory, as a model's projections give them
        return torch.randn(1, lc, heads, d, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)

    q, k, v = mk(h), mk(hkv), mk(hkv)
    lengths = [min(blk, lc - s) for s in range(0, lc, blk)]
    with torch.no_grad():
        out, lse = local_attention(q, phase1_parts(k, v, lengths, has_block0=True, anchor_len=anc), scale=None,
                                   backend="auto")
        plain, plain_lse = local_attention(q, phase1_parts(k, v, lengths, has_block0=True, anchor_len=anc),
                                           scale=None, backend="math")
    assert out.dtype == torch.bfloat16 and out.stride() == q.stride()
    rows = torch.randperm(lc, generator=torch.Generator().manual_seed(0))[:96].sort().values.tolist()
    mask = star_mask(lc, blk, anc)[rows]
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    ref, ref_lse = reference_attention(q64[:, :, rows], k64, v64, mask)
    assert _err(out[:, :, rows], ref) <= 2 * _err(plain[:, :, rows], ref) + 4 * torch.finfo(torch.bfloat16).eps
    # the log-sum-exp is float32 on every path: within twice the plain (math) kernel's error in bf16 plus
    # 4 float32 eps at its scale; phase 1 without its anchor (the mask with a = 0) lies outside that bound
    assert_close_to_oracle("phase 1 lse", lse[:, :, rows], ref_lse, plain_lse[:, :, rows], torch.float32)
    no_anchor = reference_attention(q64[:, :, rows], k64, v64, star_mask(lc, blk, 0)[rows])[1]
    assert_bound_not_vacuous("phase 1 lse", no_anchor, ref_lse, plain_lse[:, :, rows], torch.float32)


def assert_greedy_within_oracle(model, context, query, tokens, block, anchor):
    """Greedy ``tokens`` of a low-precision ``model`` against the float64 model-level oracle, teacher-forced
    on the tokens themselves: at every step the chosen token's oracle logit is within ``2 e`` of the
    oracle's best, where ``e`` is twice the plain model's logit error in that dtype (same weights, SDPA,
    the dense ``M_star`` mask, over the same sequence; ``common.plain_model_logits``). Why ``2 e``: with
    logits within ``e`` of the oracle's, the argmax ``t`` has ``oracle[t] >= ours[t] - e >= ours[best] - e
    >= oracle[best] - 2 e``. Returns the largest shortfall seen and the bound."""
    from common import plain_model_logits
    from model_oracle import oracle_logits, reference_model

    device = next(model.parameters()).device
    context, tokens = context.to(device), tokens.to(device)
    seen = torch.cat([query.to(device), tokens[:, :-1]], dim=1)  # the step before each token
    ref = oracle_logits(reference_model(model), context, seen, block, anchor)
    e = 2 * _err(plain_model_logits(model, context, seen, block, anchor), ref)
    steps = ref[:, query.shape[1] - 1:]  # the logits that chose each token
    shortfall = (steps.max(dim=-1).values - steps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)).max().item()
    assert shortfall <= 2 * e, f"a greedy token is {shortfall:.3g} below the oracle's best (bound {2 * e:.3g})"
    return shortfall, 2 * e


@pytest.mark.parametrize("attention, dtype", [("star", torch.float64), ("global", torch.float64),
                                              ("star", torch.bfloat16)])
def test_decode_graph_replays_the_step(attention, dtype):
    """``decode_graphs='on'`` captures one decode step per request as a CUDA graph and replays it per
    token: the same greedy and sampled tokens and EOS stops as the same step without capture
    ('static'); in float64 also as the plain loop ('off'); in bf16 every greedy token is one the float64
    oracle allows at bf16's error (``assert_greedy_within_oracle``); the stats say a graph ran."""
    from star_sp import SamplingConfig, StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build("llama", dtype=dtype, head_dim=16)  # 16: the fused kernels take it (12 goes to math)
    model = model.cuda()
    gen = torch.Generator().manual_seed(4)
    ctx = torch.randint(4, model.config.vocab_size, (2, 61), generator=gen)
    q = torch.randint(4, model.config.vocab_size, (2, 3), generator=gen)
    runs = {}
    for mode in ("off", "static", "on"):
        engine = StarEngine(model, StarConfig(block_size=16, anchor_size=8, decode_graphs=mode), attention=attention)
        context = engine.prefill(ctx)
        greedy = engine.generate(context, q, 12)
        assert engine.stats["decode_mode"] == {"off": "plain", "static": "static", "on": "graph"}[mode]
        sampled = engine.generate(context, q, 12, sampling=SamplingConfig(do_sample=True, temperature=1.3, seed=1))
        stopped = engine.generate(context, q, 12, eos_token_id=int(greedy[0, 5]), pad_token_id=0)
        runs[mode] = greedy, sampled, stopped
    for a, b in zip(runs["static"], runs["on"]):
        assert torch.equal(a, b)
    if dtype == torch.float64:
        for a, b in zip(runs["off"], runs["on"]):
            assert torch.equal(a, b)
    else:
        assert_greedy_within_oracle(model, ctx, q, runs["on"][0], 16, 8)


def test_questions_and_contexts_of_different_lengths_decode_with_a_graph():
    """Several questions of different lengths over one context, and several contexts of different lengths
    (one question each), decoded with a captured CUDA graph ('on'): the same tokens as the same step
    without capture ('static') and as the plain loop ('off'), in float64."""
    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build("llama", dtype=torch.float64, head_dim=16)
    model = model.cuda()
    gen = torch.Generator().manual_seed(6)
    vocab = model.config.vocab_size
    ctx = torch.randint(4, vocab, (1, 61), generator=gen)
    contexts = [torch.randint(4, vocab, (n,), generator=gen) for n in (45, 12, 33)]
    questions = [torch.randint(4, vocab, (n,), generator=gen) for n in (2, 6, 3)]
    runs = {}
    for mode in ("off", "static", "on"):
        engine = StarEngine(model, StarConfig(block_size=16, anchor_size=8, decode_graphs=mode))
        one = engine.generate(engine.prefill(ctx), questions, 12)
        assert engine.stats["decode_mode"] == {"off": "plain", "static": "static", "on": "graph"}[mode]
        several = engine.generate(engine.prefill(contexts), questions, 12)
        runs[mode] = one, several
    for mode in ("static", "on"):
        for a, b in zip(runs["off"], runs[mode]):
            assert torch.equal(a, b), mode


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_engine_on_cuda(dtype):
    """``StarConfig(compile=True)`` on the GPU with graph decoding: in float64 the same greedy tokens as the
    uncompiled engine; in bf16 every greedy token is one the float64 oracle allows at bf16's error; a
    second request of other lengths compiles nothing."""
    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build("llama", dtype=dtype, head_dim=16)
    model = model.cuda()
    gen = torch.Generator().manual_seed(8)
    ctx = torch.randint(4, model.config.vocab_size, (1, 61), generator=gen)
    q = torch.randint(4, model.config.vocab_size, (1, 3), generator=gen)
    plain = StarEngine(model, StarConfig(block_size=16, anchor_size=8, decode_graphs="on"))
    compiled = StarEngine(model, StarConfig(block_size=16, anchor_size=8, decode_graphs="on", compile=True))
    want = plain.generate(plain.prefill(ctx), q, 12)
    got = compiled.generate(compiled.prefill(ctx), q, 12)
    assert compiled.stats["decode_mode"] == "graph"
    if dtype == torch.float64:
        assert torch.equal(got, want)
    else:
        assert_greedy_within_oracle(model, ctx, q, got, 16, 8)
    other = torch.randint(4, model.config.vocab_size, (1, 77), generator=gen)
    compiled.prefill(other)
    assert compiled.stats["compile_s"] == 0.0


def test_decode_graph_captures_the_merge_over_nccl(tmp_path):
    """The decode step captured with phase 2's merge (its NCCL all-reduces) inside the graph: one GPU,
    a one-rank NCCL group, so the engine runs its distributed path ('on' across processes needs NCCL).
    The same tokens as the static step through the same group and as one process, in float64."""
    import torch.distributed as dist

    from star_sp import StarConfig, StarEngine
    from star_sp.testing import build

    model, _ = build("llama", dtype=torch.float64, head_dim=16)
    model = model.cuda()
    gen = torch.Generator().manual_seed(9)
    ctx = torch.randint(4, model.config.vocab_size, (1, 61), generator=gen)
    q = torch.randint(4, model.config.vocab_size, (1, 3), generator=gen)
    alone = StarEngine(model, StarConfig(block_size=16, anchor_size=8, decode_graphs="on"))
    want = alone.generate(alone.prefill(ctx), q, 12)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        group = dist.new_group([0])
        runs = {}
        for mode in ("static", "on"):
            engine = StarEngine(model, StarConfig(block_size=16, anchor_size=8, decode_graphs=mode), group)
            runs[mode] = engine.generate(engine.prefill(ctx), q, 12)
            assert engine.stats["decode_mode"] == {"static": "static", "on": "graph"}[mode]
        assert torch.equal(runs["static"], want) and torch.equal(runs["on"], want)
    finally:
        dist.destroy_process_group()
