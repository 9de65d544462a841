"""``StarConfig(compile=...)``: the model's element-wise work compiled by torch.compile around Star's
attention. On CPU with inductor (a C++ compiler; about half a minute for the tiny model) in one process,
and with the ``aot_eager`` backend (the same graphs, no code generation) in two: greedy tokens equal the
float64 oracle's, logits equal it to ``LOGIT_ATOL``, a second request of other lengths compiles nothing
(dynamic shapes), and the user's model is left as it was."""

import logging

import pytest
import torch

import workers
from model_oracle import LOGIT_ATOL, oracle_greedy, oracle_logits, reference_model
from star_sp import StarConfig, StarInputError
from star_sp.testing import build

SPEC = dict(family="llama", block=16, anchor=5, steps=4, requests=[(45, 4), (61, 3)])


def _check(results, spec):
    model, _ = build(spec["family"], dtype=torch.float64)
    ref = reference_model(model)
    for r in results:
        assert r["restored"]
        first, second = r["requests"]
        assert second["compile_s"] == 0.0  # one compilation serves every length
        for req in (first, second):
            want = oracle_greedy(ref, req["ctx"], req["q"], spec["block"], spec["anchor"], spec["steps"])
            assert torch.equal(req["tokens"], want), (req["tokens"], want)
            logits = oracle_logits(ref, req["ctx"], req["q"], spec["block"], spec["anchor"]).float()
            torch.testing.assert_close(req["logits"], logits, rtol=0, atol=LOGIT_ATOL)
    return results


def test_compiled_engine_with_inductor_equals_the_oracle():
    results = _check([workers.compiled_run(None, dict(SPEC, compile=True))], SPEC)
    assert results[0]["requests"][0]["compile_s"] > 0  # reported apart


@pytest.mark.slow
def test_compiled_engine_across_two_processes_equals_the_oracle(cluster):
    _check(cluster(2).run(workers.compiled_run, dict(SPEC, compile="aot_eager"), timeout_s=300), SPEC)


def test_compile_setting_is_checked():
    for bad in ("", 1, None):
        with pytest.raises(StarInputError, match="compile must be True, False or a torch.compile backend"):
            StarConfig(block_size=8, compile=bad)


def test_every_layer_of_a_deep_model_runs_compiled(caplog):
    """The decoder layers share one code object: a 10-layer model (more than torch._dynamo's 8
    compilations per code object) compiles without hitting the recompile limit, which would leave the
    layers after the 8th eager with only a log line to say so."""
    from star_sp import StarEngine

    model, _ = build("llama", dtype=torch.float64, num_hidden_layers=10)
    engine = StarEngine(model, StarConfig(block_size=16, anchor_size=5, decode_graphs="static", compile="aot_eager"))
    ctx = torch.randint(4, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    dynamo_log = logging.getLogger("torch._dynamo")  # its own handler: torch may stop it propagating to root
    dynamo_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="torch._dynamo"):
            engine.generate(engine.prefill(ctx), ctx[:, :3], 3)
    finally:
        dynamo_log.removeHandler(caplog.handler)
    hits = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert not hits, hits[0]
