"""StarEngine on tiny random models of four families against the float64 model-level oracle.

Bugs these localize: the transformers adapter (wrong positions, KV kept or dropped wrongly, phases
mixed up), the generation loop, and model checks. The attention math itself is covered by
test_star_local.py and test_distributed.py.
"""

import pytest
import torch

import workers
from model_oracle import LOGIT_ATOL, oracle_greedy, oracle_logits, reference_model
from star_sp import SamplingConfig, StarConfig, StarEngine, StarInputError
from star_sp.testing import build

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def _ids(batch, n, seed, vocab):
    return torch.randint(4, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block, anchor, lc, lq, batch", [(7, 7, 23, 3, 2), (6, 2, 31, 1, 1), (5, 3, 20, 4, 3)])
def test_engine_matches_oracle(family, block, anchor, lc, lq, batch):
    model, _ = build(family, dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = _ids(batch, lc, 1, model.config.vocab_size), _ids(batch, lq, 2, model.config.vocab_size)
    engine = StarEngine(model, StarConfig(block_size=block, anchor_size=anchor))
    context = engine.prefill(ctx)
    logits = engine.score(context, q)
    expected = oracle_logits(ref, ctx, q, block, anchor)
    assert logits.shape == (batch, lq, model.config.vocab_size)
    assert (logits - expected).abs().max() < LOGIT_ATOL
    tokens = engine.generate(context, q, 5)
    assert torch.equal(tokens, oracle_greedy(ref, ctx, q, block, anchor, 5))
    # the oracle's mask is not plain causal here: star must differ from the plain model
    plain = oracle_logits(ref, ctx, q, lc, lc)
    assert (expected - plain).abs().max() > 100 * LOGIT_ATOL


@pytest.mark.parametrize("block", [20, 21, 64])
def test_one_block_equals_plain_model_and_global(block):
    model, _ = build("llama", dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = _ids(2, 20, 3, model.config.vocab_size), _ids(2, 3, 4, model.config.vocab_size)
    with torch.no_grad():
        plain = ref(torch.cat([ctx, q], 1)).logits[:, 20:]
    star = StarEngine(model, StarConfig(block_size=block, anchor_size=1))
    assert (star.score(star.prefill(ctx), q) - plain).abs().max() < LOGIT_ATOL
    glob = StarEngine(model, StarConfig(block_size=4, anchor_size=2), attention="global")
    assert (glob.score(glob.prefill(ctx), q) - plain).abs().max() < LOGIT_ATOL


def test_context_is_reused_across_queries_unchanged():
    model, _ = build("qwen2", dtype=torch.float64)
    vocab = model.config.vocab_size
    engine = StarEngine(model, StarConfig(block_size=6, anchor_size=3))
    ctx = _ids(2, 25, 5, vocab)
    context = engine.prefill(ctx)
    before = [t.clone() for t in context.kv.k + context.kv.v]
    queries = [_ids(2, n, 10 + n, vocab) for n in (1, 3, 2)]
    first = [engine.score(context, q) for q in queries]
    gen = engine.generate(context, queries[1], 6)
    again = [engine.score(context, q) for q in queries]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(before, context.kv.k + context.kv.v))
    assert torch.equal(gen, engine.generate(engine.prefill(ctx), queries[1], 6))


def test_generation_stops_on_eos_and_stop_strings():
    model, tok = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=6, anchor_size=3))
    ctx, q = _ids(2, 19, 6, model.config.vocab_size), _ids(2, 2, 7, model.config.vocab_size)
    context = engine.prefill(ctx)
    free = engine.generate(context, q, 6)
    eos = int(free[0, 2])
    stopped = engine.generate(context, q, 6, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, 2] == eos and (stopped[0, 3:] == 0).all()
    assert torch.equal(stopped[1][: (free[1] == eos).nonzero()[0, 0] + 1 if (free[1] == eos).any() else 6],
                       free[1][: (free[1] == eos).nonzero()[0, 0] + 1 if (free[1] == eos).any() else 6])
    word = tok.decode([int(free[0, 1])])
    one = engine.prefill(ctx[:1])
    by_text = engine.generate(one, q[:1], 6, stop_strings=[word], tokenizer=tok)
    assert by_text.shape[1] == 2 and torch.equal(by_text[0], free[0, :2])


def test_sampling_is_seeded_and_differs_from_greedy():
    model, _ = build("mistral", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=5, anchor_size=5))
    ctx, q = _ids(2, 12, 8, model.config.vocab_size), _ids(2, 2, 9, model.config.vocab_size)
    context = engine.prefill(ctx)
    cfg = SamplingConfig(do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=11)
    a = engine.generate(context, q, 8, sampling=cfg)
    assert torch.equal(a, engine.generate(context, q, 8, sampling=cfg))
    assert not torch.equal(a, engine.generate(context, q, 8))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("anchor_source", ["broadcast", "recompute", "paper"])
def test_engine_across_ranks_matches_oracle(cluster, world_size, anchor_source):
    spec = dict(family="qwen3", block=5, anchor=2, lc=17, lq=3, batch=2, steps=4, anchor_source=anchor_source)
    results = cluster(world_size).run(workers.engine_run, spec)
    model, _ = build("qwen3", dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = workers.engine_inputs(spec, model.config.vocab_size)
    expected = oracle_logits(ref, ctx, q, 5, 2)
    greedy = oracle_greedy(ref, ctx, q, 5, 2, 4)
    single = workers.engine_run(None, spec)
    for r in results:
        assert (r["logits"] - expected).abs().max() < LOGIT_ATOL
        assert torch.equal(r["greedy"], greedy)
        assert torch.equal(r["sampled"], results[0]["sampled"])  # one token stream on every rank
    assert torch.equal(results[0]["sampled"], single["sampled"])
    assert sum(r["local_tokens"] for r in results) == 17  # each host keeps only its own blocks' KV
    assert results[-1]["query_kv"] and not any(r["query_kv"] for r in results[:-1])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])  # 2 and 4 ranks: tests/test_ring.py, test_launch.py
def test_ring_attention_engine_is_exact_across_ranks(cluster, world_size):
    """attention='ring': exact causal prefill across hosts (zigzag shares), queries merged like phase 2."""
    spec = dict(family="llama", block=5, anchor=2, lc=19, lq=3, batch=2, steps=4, anchor_source="broadcast",
                attention="ring")
    results = [workers.engine_run(None, spec)] if world_size == 1 else cluster(world_size).run(workers.engine_run, spec)
    model, _ = build("llama", dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = workers.engine_inputs(spec, model.config.vocab_size)
    expected = oracle_logits(ref, ctx, q, 19, 1)  # one block: plain causal attention
    greedy = oracle_greedy(ref, ctx, q, 19, 1, 4)
    for r in results:
        assert (r["logits"] - expected).abs().max() < LOGIT_ATOL
        assert torch.equal(r["greedy"], greedy)
        assert torch.equal(r["sampled"], results[0]["sampled"])
    assert sum(r["local_tokens"] for r in results) == 19  # each host keeps its zigzag share of the KV
    assert results[-1]["query_kv"] and not any(r["query_kv"] for r in results[:-1])


@pytest.mark.slow
@pytest.mark.parametrize("world_size, lc", [(3, 5), (2, 3), (4, 1)])
def test_ring_attention_with_fewer_than_two_tokens_per_rank_is_exact(cluster, world_size, lc):
    """A context too short for two zigzag chunks per host is encoded as one block on the last host."""
    spec = dict(family="llama", block=5, anchor=2, lc=lc, lq=2, batch=1, steps=3, anchor_source="broadcast",
                attention="ring")
    _assert_exact_everywhere(cluster(world_size).run(workers.engine_run, spec), spec, lc, 1)


def _assert_exact_everywhere(results, spec, block, anchor):
    model, _ = build(spec["family"], dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = workers.engine_inputs(spec, model.config.vocab_size)
    expected = oracle_logits(ref, ctx, q, block, anchor)
    greedy = oracle_greedy(ref, ctx, q, block, anchor, spec["steps"])
    for r in results:
        assert (r["logits"] - expected).abs().max() < LOGIT_ATOL
        assert torch.equal(r["greedy"], greedy)
        assert torch.equal(r["sampled"], results[0]["sampled"])
    assert sum(r["local_tokens"] for r in results) == spec["lc"]
    assert results[-1]["query_kv"] and not any(r["query_kv"] for r in results[:-1])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size, lc, block, anchor", [(2, 40, 64, 8), (3, 40, 64, 64), (4, 1, 4, 2),
                                                           (4, 13, 5, 3), (4, 9, 4, 0)])
def test_context_of_fewer_blocks_than_hosts_is_exact(cluster, world_size, lc, block, anchor):
    """Hosts past the context's blocks hold nothing and add nothing to the merge; the last host answers."""
    spec = dict(family="qwen3", block=block, anchor=anchor, lc=lc, lq=3, batch=2, steps=3,
                anchor_source="broadcast")
    results = _assert_exact_everywhere(cluster(world_size).run(workers.engine_run, spec), spec, block, anchor)
    blocks = -(-lc // block)
    assert sum(r["local_tokens"] == 0 for r in results) == world_size - min(blocks, world_size)


def _sliding_mistral():
    return build("mistral", sliding_window=8)[0]


def _bloom():
    import transformers

    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))


def _t5():
    import transformers

    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2)
    return transformers.T5ForConditionalGeneration(cfg)


def _gemma2():
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=50, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return transformers.Gemma2ForCausalLM(cfg)


@pytest.mark.parametrize("make, words", [
    (_sliding_mistral, "sliding-window"), (_bloom, "ALiBi"), (_t5, "encoder-decoder"), (_gemma2, "sliding_attention"),
    (lambda: torch.nn.Linear(2, 2), "not a transformers model"),
])
def test_unsupported_models_are_refused(make, words):
    with pytest.raises(StarInputError, match=words):
        StarEngine(make(), StarConfig(block_size=8))


def test_bad_inputs_raise_clear_errors():
    model, _ = build("llama")
    engine = StarEngine(model, StarConfig(block_size=8))
    with pytest.raises(StarInputError, match="context_ids is empty"):
        engine.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(StarInputError, match="LongTensor"):
        engine.prefill(torch.zeros(1, 5))
    context = engine.prefill(torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(StarInputError, match="query_ids is empty"):
        engine.generate(context, torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(StarInputError, match="batch 1 but the context was prefilled with batch 2"):
        engine.score(context, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(StarInputError, match="max_new_tokens must be a positive integer"):
        engine.generate(context, torch.ones(2, 2, dtype=torch.long), 0)
    with pytest.raises(StarInputError, match="need a tokenizer"):
        engine.generate(context, torch.ones(2, 2, dtype=torch.long), 2, stop_strings=["x"])
    with pytest.raises(StarInputError, match="block_size must be a positive integer"):
        StarEngine(model, StarConfig(block_size=0))
    with pytest.raises(StarInputError, match="attention must be"):
        StarEngine(model, StarConfig(block_size=8), attention="sparse")
    model.set_attn_implementation("star")  # the registered function, called outside an engine's call
    with pytest.raises(StarInputError, match="only inside star_sp.StarEngine"):
        model(torch.ones(1, 3, dtype=torch.long))
    model.set_attn_implementation("sdpa")
    with pytest.raises(StarInputError, match="decode_graphs must be one of"):
        StarConfig(block_size=8, decode_graphs="yes")
    graphs = StarEngine(model, StarConfig(block_size=8, decode_graphs="on"))
    with pytest.raises(StarInputError, match="model is on cpu.*decode_graphs='auto'"):
        graphs.generate(graphs.prefill(torch.ones(1, 9, dtype=torch.long)), torch.ones(1, 2, dtype=torch.long), 3)


@pytest.mark.parametrize("family, attention, batch, lq", [("llama", "star", 2, 3), ("qwen3", "star", 1, 1),
                                                          ("mistral", "global", 3, 2)])
def test_fixed_shape_decode_step_matches_oracle(family, attention, batch, lq):
    """``decode_graphs='static'`` runs the step that a CUDA graph captures (its KV written at, and the
    query KV masked from, a device-side fill level; no slicing by Python numbers) without capturing it:
    greedy tokens equal the oracle's, sampled tokens and EOS stops equal the plain loop's."""
    model, _ = build(family, dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = _ids(batch, 23, 31, model.config.vocab_size), _ids(batch, lq, 32, model.config.vocab_size)
    block, anchor = (7, 3) if attention == "star" else (23, 23)
    runs = {}
    for mode in ("off", "static"):
        engine = StarEngine(model, StarConfig(block_size=7, anchor_size=3, decode_graphs=mode), attention=attention)
        context = engine.prefill(ctx)
        greedy = engine.generate(context, q, 9)
        assert engine.stats["decode_mode"] == ("plain" if mode == "off" else "static")
        sampled = engine.generate(context, q, 9, sampling=SamplingConfig(do_sample=True, temperature=1.4, seed=2))
        eos = int(greedy[0, 4])
        runs[mode] = greedy, sampled, engine.generate(context, q, 9, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(runs["static"][0], oracle_greedy(ref, ctx, q, block, anchor, 9))
    for a, b in zip(runs["off"], runs["static"]):
        assert torch.equal(a, b)
    assert runs["static"][2][0, 4] == int(runs["static"][0][0, 4]) and (runs["static"][2][0, 5:] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3])  # a host with context only, one idle of the query, the query host
def test_fixed_shape_decode_step_across_ranks(cluster, world_size):
    """The same fixed-shape step with the all-reduce merge across gloo ranks: the oracle's greedy tokens
    and one sampled stream on every rank, equal to one process's."""
    spec = dict(family="llama", block=5, anchor=3, lc=19, lq=2, batch=2, steps=6, anchor_source="broadcast",
                decode_graphs="static")
    results = cluster(world_size).run(workers.engine_run, spec)
    model, _ = build("llama", dtype=torch.float64)
    ctx, q = workers.engine_inputs(spec, model.config.vocab_size)
    greedy = oracle_greedy(reference_model(model), ctx, q, 5, 3, 6)
    single = workers.engine_run(None, {**spec, "decode_graphs": "off"})
    for r in results:
        assert r["decode_mode"] == "static" and torch.equal(r["greedy"], greedy)
        assert torch.equal(r["sampled"], single["sampled"])


def test_decode_step_guards_and_capture_fallback(monkeypatch):
    """A failed capture under decode_graphs='auto' warns once and decodes with the same step uncaptured
    (same tokens as the plain loop); 'on' lets the failure through. The static KV refuses to grow
    past its capacity, a decode step refuses more than one token, and a bad context is a clear error."""
    from star_sp.runtime.kv_cache import StaticQueryKV
    from star_sp.runtime.passes import DecodeStepPass
    from star_sp.runtime.decode_step import DecodeStep

    model, _ = build("llama", dtype=torch.float64)
    ctx, q = _ids(2, 19, 41, model.config.vocab_size), _ids(2, 2, 42, model.config.vocab_size)
    plain = StarEngine(model, StarConfig(block_size=6, anchor_size=3, decode_graphs="off"))
    want = plain.generate(plain.prefill(ctx), q, 9)
    # on CPU, DecodeStep(capture=True) fails at once (no CUDA stream): the fallback path runs
    monkeypatch.setattr(StarEngine, "_decode_mode", lambda self, context, n: ("graph", None))
    auto = StarEngine(model, StarConfig(block_size=6, anchor_size=3))
    with pytest.warns(RuntimeWarning, match="capturing the decode step failed"):
        got = auto.generate(auto.prefill(ctx), q, 9)
    assert torch.equal(got, want) and auto.stats["decode_mode"] == "static"
    insist = StarEngine(model, StarConfig(block_size=6, anchor_size=3, decode_graphs="on"))
    with pytest.raises(Exception) as failed:
        insist.generate(insist.prefill(ctx), q, 9)
    monkeypatch.undo()
    try:  # 'on' lets the capture's own failure through, unchanged
        DecodeStep(plain, plain.prefill(ctx), None, 2, 21, capture=True)
    except Exception as exc:  # noqa: BLE001
        assert type(failed.value) is type(exc) and str(failed.value) == str(exc), (failed.value, exc)
    else:
        raise AssertionError("capturing a decode step on CPU should fail")

    kv = StaticQueryKV(2, 3, torch.device("cpu"))
    kv.append(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="holds 3 tokens; 2 are used and 2 more"):
        kv.append(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    step = DecodeStepPass(plain.prefill(ctx), 2, kv)
    with pytest.raises(StarInputError, match="one token per sequence, got 2"):
        step.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), 0)
    for bad in (None, "context"):
        with pytest.raises(StarInputError, match="context must be what prefill"):
            plain.generate(bad, q, 3)


@pytest.mark.slow
def test_query_host_failure_in_generate_reaches_every_rank_promptly(cluster):
    timeout_s = 60.0
    results = cluster(3).run(workers.generate_with_failing_stop_check, timeout_s)
    for r in results:
        assert r["error"] == "StarCollectiveError", r
        assert r["message"] == results[0]["message"]
        assert "rank 2 (the query host)" in r["message"] and "tokenizer broke while decoding" in r["message"]
        assert r["seconds"] < timeout_s / 4, r  # not after the collective's timeout


def test_config_is_optional_for_global_and_ring_but_not_star():
    model, _ = build("llama", dtype=torch.float64)
    ref = reference_model(model)
    ctx, q = _ids(1, 9, 3, model.config.vocab_size), _ids(1, 2, 4, model.config.vocab_size)
    expected = oracle_logits(ref, ctx, q, 9, 9)
    for attention in ("global", "ring"):
        engine = StarEngine(model, attention=attention)
        assert (engine.score(engine.prefill(ctx), q) - expected).abs().max() < LOGIT_ATOL
    with pytest.raises(StarInputError, match=r"Star Attention needs one, e\.g\. StarConfig\(block_size="):
        StarEngine(model)


def test_engine_leaves_the_users_model_as_it_was():
    model, _ = build("llama", dtype=torch.float64)
    ctx, q = _ids(1, 11, 3, model.config.vocab_size), _ids(1, 2, 4, model.config.vocab_size)
    before = model.config._attn_implementation
    with torch.no_grad():
        logits_before = model(torch.cat([ctx, q], 1)).logits
        generated_before = model.generate(ctx, max_new_tokens=3, do_sample=False)
    engine = StarEngine(model, StarConfig(block_size=4, anchor_size=2))
    assert model.config._attn_implementation == before
    context = engine.prefill(ctx)
    engine.score(context, q)
    engine.generate(context, q, 3)
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(torch.cat([ctx, q], 1)).logits, logits_before)
        assert torch.equal(model.generate(ctx, max_new_tokens=3, do_sample=False), generated_before)


def test_one_new_token_has_no_decode_rate():
    model, _ = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=4))
    engine.generate(engine.prefill(_ids(1, 9, 3, model.config.vocab_size)), _ids(1, 2, 4, model.config.vocab_size), 1)
    assert engine.stats["new_tokens"] == 1 and engine.stats["decode_tokens_per_s"] is None  # not NaN


def test_engine_restores_the_model_when_a_call_fails():
    model, _ = build("llama", dtype=torch.float64)
    before = model.config._attn_implementation
    engine = StarEngine(model, StarConfig(block_size=4))
    with pytest.raises(StarInputError):
        engine.prefill(torch.zeros(1, 0, dtype=torch.long))
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("other, words", [
    (dict(num_hidden_layers=3), "layers 2 (here 3)"),
    (dict(num_key_value_heads=4), "kv_heads 2 (here 4)"),
    (dict(head_dim=8), "head_dim"),
    ("float32", "dtype float64 (here float32)"),
    ("same shapes", "another model object (same shapes, other weights)"),
])
def test_context_from_another_model_is_refused(other, words):
    model, _ = build("llama", dtype=torch.float64)
    if other == "float32":
        second = build("llama", dtype=torch.float32)[0]
    elif other == "same shapes":
        second = build("llama", dtype=torch.float64)[0]
    else:
        second = build("llama", dtype=torch.float64, **other)[0]
    ctx, q = _ids(1, 9, 3, model.config.vocab_size), _ids(1, 2, 4, model.config.vocab_size)
    context = StarEngine(model, StarConfig(block_size=4)).prefill(ctx)
    engine = StarEngine(second, StarConfig(block_size=4))
    for call in (lambda: engine.score(context, q), lambda: engine.generate(context, q, 2)):
        with pytest.raises(StarInputError, match="this context was prefilled with another model") as info:
            call()
        assert words in str(info.value) and "prefill the context with this engine's model" in str(info.value)


def test_token_ids_outside_the_vocabulary_are_refused():
    model, _ = build("llama", dtype=torch.float64)
    vocab = model.get_input_embeddings().num_embeddings
    engine = StarEngine(model, StarConfig(block_size=4))
    ctx = _ids(1, 9, 3, vocab)
    with pytest.raises(StarInputError, match=rf"context_ids holds token id {vocab}, outside the model's vocabulary "
                                             rf"of {vocab} ids \(0 to {vocab - 1}\); encode the text with the "
                                             "model's own tokenizer"):
        engine.prefill(torch.cat([ctx, torch.tensor([[vocab]])], 1))
    context = engine.prefill(ctx)
    with pytest.raises(StarInputError, match="query_ids holds token id -1, outside"):
        engine.score(context, torch.tensor([[3, -1]]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("attention, decode_graphs", [("star", "off"), ("star", "static"), ("ring", "off")])
@pytest.mark.parametrize("lengths, listed", [([4, 4, 4], False), ([2, 6, 3], True)], ids=["one-length", "list"])
def test_many_questions_over_one_context_equal_each_alone_and_the_oracle(cluster, world_size, attention,
                                                                          decode_graphs, lengths, listed):
    """One context prefilled once (batch 1), three questions decoded together, as one (Q, Lq) tensor or as
    a list of different lengths (left-padded, the padding never attended, each question at its own
    positions): each question's greedy tokens are what it gets alone and what the oracle gives for
    [context ; question], its logits the oracle's, and its sampled tokens (its own seed) what it samples
    alone."""
    spec = dict(family="llama", block=16, anchor=5, lc=45, lengths=lengths, listed=listed, steps=4,
                attention=attention, decode_graphs=decode_graphs)
    results = ([workers.questions_run(None, spec)] if world_size == 1
               else cluster(world_size).run(workers.questions_run, spec))
    model, _ = build("llama", dtype=torch.float64)
    ref = reference_model(model)
    block, anchor = (spec["block"], spec["anchor"]) if attention == "star" else (spec["lc"], 1)
    for r in results:
        for i, q in enumerate(r["questions"]):
            want = oracle_greedy(ref, r["ctx"], q[None], block, anchor, spec["steps"])
            assert torch.equal(r["greedy"][i:i + 1], want), (i, r["greedy"][i], want)
            assert torch.equal(r["alone"][i], want)
            assert r["logits"][i].shape[1] == len(q)
            torch.testing.assert_close(r["logits"][i], oracle_logits(ref, r["ctx"], q[None], block, anchor).float(),
                                       rtol=0, atol=LOGIT_ATOL)
            assert torch.equal(r["sampled"][i:i + 1], r["sampled_alone"][i])  # its own seed, batched or alone


def test_bad_question_lists_are_refused_in_one_line():
    model, _ = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=16, anchor_size=4))
    one = engine.prefill(torch.randint(4, 100, (1, 30)))
    two = engine.prefill(torch.randint(4, 100, (2, 30)))
    q = torch.randint(4, 100, (3,))
    for context, questions, message in ((one, [q, torch.zeros(0, dtype=torch.long)], "question 1 of the list is empty"),
                                        (one, [], "empty list"),
                                        (one, [q, q.float()], "question 1 of the list must be a LongTensor"),
                                        (two, [q, q], "prefill one context \\(batch 1\\)")):
        with pytest.raises(StarInputError, match=message):
            engine.generate(context, questions, 2)
    limit = model.config.max_position_embeddings
    with pytest.raises(StarInputError, match="positions, more than the model's"):
        engine.generate(one, q[None], limit)
    several = engine.prefill([torch.randint(4, 100, (30,)), torch.randint(4, 100, (12,))])
    with pytest.raises(StarInputError, match="holds 2 contexts but 3 queries came"):
        engine.generate(several, [q, q, q], 2)
    for contexts, message in (([], "empty list"), ([torch.randint(4, 100, (2, 5))], "context 0 of the list must be")):
        with pytest.raises(StarInputError, match=message):
            engine.prefill(contexts)


@pytest.mark.parametrize("world_size, attention, decode_graphs", [
    (n, a, g) for n in (1, 2, 3) for a, g in (("star", "off"), ("star", "static"), ("ring", "off"))] + [
    (1, "global", "off"), (1, "global", "static")])  # global attention is one process
def test_contexts_of_different_lengths_decode_together_as_each_alone_and_the_oracle(cluster, world_size, attention,
                                                                                   decode_graphs):
    """Three contexts of different lengths (each its own block layout; one shorter than two blocks) in one
    batch, a question of its own length for each, decoded together: each equals itself alone and the
    oracle over [its context ; its question]."""
    spec = dict(family="llama", block=16, anchor=5, contexts=[45, 12, 33], questions=[3, 5, 2], steps=4,
                attention=attention, decode_graphs=decode_graphs)
    results = ([workers.contexts_run(None, spec)] if world_size == 1
               else cluster(world_size).run(workers.contexts_run, spec))
    model, _ = build("llama", dtype=torch.float64)
    ref = reference_model(model)
    for r in results:
        for i, (c, q) in enumerate(zip(r["contexts"], r["questions"])):
            block, anchor = (spec["block"], spec["anchor"]) if attention == "star" else (len(c), 1)
            want = oracle_greedy(ref, c[None], q[None], block, anchor, spec["steps"])
            assert torch.equal(r["greedy"][i:i + 1], want), (i, r["greedy"][i], want)
            assert torch.equal(r["alone"][i], want)
            torch.testing.assert_close(r["logits"][i], oracle_logits(ref, c[None], q[None], block, anchor).float(),
                                       rtol=0, atol=LOGIT_ATOL)


def test_positions_limit_counts_rope_scaling_and_is_checked_at_prefill():
    from types import SimpleNamespace

    from star_sp.runtime.inputs import positions_limit

    assert positions_limit(SimpleNamespace(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})) == 131072
    assert positions_limit(SimpleNamespace(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})) == 131072
    assert positions_limit(SimpleNamespace(max_position_embeddings=4096, rope_parameters={"rope_type": "default"})) == 4096
    model, _ = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=16, anchor_size=4))
    limit = model.config.max_position_embeddings
    with pytest.raises(StarInputError, match="no room is left for a question"):
        engine.prefill(torch.randint(4, 100, (1, limit)))


def test_ranks_share_the_outcome_of_a_decode_graph_capture(cluster):
    """Across processes a decode-step capture that fails on one rank must not leave the others
    replaying a graph: under 'auto' every rank falls back (one warning naming the rank) and the tokens
    equal the float64 oracle's; under 'on' every rank raises the same error. On CPU processes 'on' is
    refused on every rank in one line (graphs need CUDA, and across processes NCCL)."""
    spec = dict(block=16, anchor=5, steps=5)
    c = cluster(2)
    auto = c.run(workers.capture_agreement_run, dict(spec, graphs="auto", fails_on=1))
    model, _ = build("llama", dtype=torch.float64)
    want = oracle_greedy(reference_model(model), auto[0]["ctx"], auto[0]["q"], spec["block"], spec["anchor"],
                         spec["steps"])
    for r in auto:
        assert r["error"] is None and torch.equal(r["tokens"], want), (r["error"], r["tokens"], want)
        assert r["mode"] == "static" and len(r["warnings"]) == 1
        assert "rank 1: RuntimeError: capture refused here" in r["warnings"][0]
    insist = c.run(workers.capture_agreement_run, dict(spec, graphs="on", fails_on=1))
    assert insist[0]["error"] == insist[1]["error"] and insist[0]["tokens"] is None
    assert "capturing the decode step failed on rank 1: RuntimeError: capture refused here" in insist[0]["error"]
    gloo = c.run(workers.capture_agreement_run, dict(spec, graphs="on", fails_on=None))
    for r in gloo:
        assert r["error"] is not None and r["error"].count("\n") == 0
        assert "in one process or across processes over NCCL; here the model is on cpu" in r["error"]


def test_a_failed_warm_up_run_is_the_requests_error_not_a_capture_to_fall_back_from(monkeypatch):
    """The un-captured run before a capture runs the step itself (and, across processes, its
    collectives as far as it gets): its failure is raised as it is, under 'auto' too, with no fallback."""
    import warnings

    from star_sp.integrations.hf import engine as tf
    from star_sp.runtime.decode_step import WarmUpError

    class WarmUpFails(tf.DecodeStep):
        def __init__(self, engine, context, query_kv, batch, position, capture):
            if capture:
                try:
                    raise ValueError("the step's own run failed")
                except ValueError as exc:
                    raise WarmUpError(str(exc)) from exc
            super().__init__(engine, context, query_kv, batch, position, capture=False)

    monkeypatch.setattr(tf, "DecodeStep", WarmUpFails)
    monkeypatch.setattr(StarEngine, "_decode_mode", lambda self, context, n: ("graph", None))
    model, _ = build("llama", dtype=torch.float64)
    engine = StarEngine(model, StarConfig(block_size=8, anchor_size=3))
    ctx = torch.randint(4, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with pytest.raises(ValueError, match="the step's own run failed"):
            engine.generate(engine.prefill(ctx), ctx[:, :2], 4)
