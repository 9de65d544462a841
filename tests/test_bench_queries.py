"""tools/bench_queries.py in its smallest form on CPU: every method answers every question count, the
batched star tokens equal the one-at-a-time tokens, the plain model is skipped where its KV cache would
not fit, and the JSON and Markdown carry their provenance."""

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from star_sp.testing import save
from test_launch import ROOT

ARGS = ["--dtype", "float32", "--contexts", "256", "--queries", "1,3", "--question-tokens", "4", "--new-tokens", "3",
        "--block", "64", "--warmup", "64"]
METHODS = {"star", "star-one-at-a-time", "engine-global", "global"}


def _tool():
    spec = importlib.util.spec_from_file_location("bench_queries", os.path.join(ROOT, "tools", "bench_queries.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save(tmp_path_factory.mktemp("bench_queries") / "tiny", "llama", tokenizer=False)


def test_every_method_and_question_count(tiny, tmp_path):
    assert _tool().main(["--model", tiny, *ARGS, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["rows"]
    assert record["provenance"]["command"].startswith("tools/bench_queries.py")
    assert sorted((r["method"], r["queries"]) for r in rows) == sorted((m, q) for m in METHODS for q in (1, 3))
    for r in rows:
        assert "error" not in r, r
        assert r["context"] == 256 and r["new_tokens"] == 3  # no EOS: every question runs all its tokens
        assert r["decode_tokens_per_s"] > 0 and r["generate_s"] > 0 and r["first_token_s"] > 0
        # the aggregate rate: every question's tokens after its first, over the decode time
        assert r["decode_tokens_per_s"] == pytest.approx(r["queries"] * 2 / r["decode_s"])
        after_first = r["generate_s"] - r["first_token_s"] - r["setup_s"]
        if r["method"] == "global":  # its generate prefills the repeated contexts itself
            assert r["prefill_s"] is None and r["total_s"] == r["generate_s"]
            assert 0 < r["decode_s"] <= after_first  # first to last step's logits (then its own wrap-up)
        else:  # as engine.stats counts it
            assert r["decode_s"] == pytest.approx(after_first, abs=1e-9)
            assert r["prefill_s"] > 0 and r["total_s"] == pytest.approx(r["prefill_s"] + r["generate_s"])
        one = next(o for o in rows if o["method"] == r["method"] and o["queries"] == 1)
        assert r["vs_q1"] == pytest.approx(r["decode_tokens_per_s"] / one["decode_tokens_per_s"])
    star = {r["queries"]: r for r in rows if r["method"] == "star"}
    alone = {r["queries"]: r for r in rows if r["method"] == "star-one-at-a-time"}
    for q in (1, 3):  # one prefill shared; greedy decoding gives the same tokens together and alone
        assert alone[q]["prefill_s"] == star[q]["prefill_s"]
        assert alone[q]["same_tokens_as_batched"] is True and alone[q]["tokens_sha"] == star[q]["tokens_sha"]
    assert star[1]["tokens_sha"] != star[3]["tokens_sha"]
    assert (star[1]["block"], star[1]["anchor"]) == (64, 64)
    md = (tmp_path / "bench.md").read_text()
    assert "| context | Q | method |" in md and "star-one-at-a-time (same tokens)" in md
    assert "tools/bench_queries.py" in md and "star at Q = 3 decodes" in md


def test_plain_model_skipped_where_its_cache_would_not_fit(tiny, tmp_path):
    """The plain model's KV: 2 layers x (K, V) x 2 KV heads x 12 dims x 4 bytes per row and position;
    a limit between Q = 1 and Q = 3 runs the first and records the second as skipped."""
    tool = _tool()
    cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                          hidden_size=48)
    import torch

    per_row = 263 * 2 * 2 * 2 * 12 * 4 / 1e9
    assert tool.plain_kv_gb(cfg, 3, 263, torch.float32) == pytest.approx(3 * per_row)
    limit = 2 * per_row
    assert tool.main(["--model", tiny, *ARGS, "--methods", "global", "--plain-max-gb", str(limit),
                      "--out", str(tmp_path)]) == 0
    rows = {r["queries"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert "error" not in rows[1] and rows[1]["decode_tokens_per_s"] > 0
    assert rows[3]["error"].startswith("skipped: needs 0 GB of KV cache") and rows[3]["vs_q1"] is None


def test_context_shortened_to_the_model_positions():
    tool = _tool()
    cfg = SimpleNamespace(max_position_embeddings=131072)
    assert tool.bench.fit_context(131072, cfg, 16, 64) == 130992
    assert tool.bench.fit_context(65536, cfg, 16, 64) == 65536


def test_mixed_batch_against_one_at_a_time(tiny, tmp_path):
    """``--mixed``: three contexts of different lengths, each with its own quarter-length block, answered
    together and one request at a time by star and the engine's global attention: the same tokens either
    way, positive aggregate rates, the prefill times summed over the contexts."""
    lengths = [96, 160, 128]
    assert _tool().main(["--model", tiny, "--dtype", "float32", "--mixed", "96,160,128", "--question-tokens", "4",
                         "--new-tokens", "3", "--block", "1/4", "--warmup", "64", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["rows"] == [] and record["settings"]["mixed"] == lengths  # --mixed alone: no question counts
    rows = {r["method"]: r for r in record["mixed_rows"]}
    assert set(rows) == {"star", "star-one-at-a-time", "engine-global", "engine-global-one-at-a-time"}
    for name, r in rows.items():
        assert "error" not in r, r
        assert r["contexts"] == 3 and r["lengths"] == lengths and r["context_tokens"] == sum(lengths)
        assert r["new_tokens"] == 3 and r["prefill_s"] > 0 and r["generate_s"] > 0
        assert r["total_s"] == pytest.approx(r["prefill_s"] + r["generate_s"])
        assert r["decode_s"] == pytest.approx(r["generate_s"] - r["first_token_s"] - r["setup_s"], abs=1e-9)
        assert r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s"] == pytest.approx(3 * 2 / r["decode_s"])
        if name.endswith("-one-at-a-time"):  # greedy decoding: each context's answer is the same alone
            batched = rows[name.removesuffix("-one-at-a-time")]
            assert r["same_tokens_as_batched"] is True and r["tokens_sha"] == batched["tokens_sha"]
            assert r["vs_one_at_a_time"] is None
            assert batched["vs_one_at_a_time"] == pytest.approx(
                batched["decode_tokens_per_s"] / r["decode_tokens_per_s"])
    assert rows["star"]["blocks"] == rows["star"]["anchors"] == [24, 40, 32]  # 1/4 of each context
    md = (tmp_path / "bench.md").read_text()
    assert "| method | S | context tokens |" in md and "star-one-at-a-time (same tokens)" in md
    assert "engine-global-one-at-a-time (same tokens)" in md and "mixed batch of 3 contexts (384 tokens" in md


def test_engine_sizes_give_each_context_its_own_block(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    tool = _tool()
    args = SimpleNamespace(block="1/4", anchor="block/2", backend="auto", decode_graphs="auto")
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    config = lambda n: tool.engine_config(args, "star", n)  # noqa: E731
    engine = tool.StarEngine(model, config(160), sizes=lambda n: (config(n).block_size, config(n).anchor_size))
    context = engine.prefill([torch.randint(4, 100, (1, n)) for n in (96, 160, 128)])
    assert [(c.layout.block_size, c.layout.anchor_size) for c in context.sequences] == [(24, 12), (40, 20), (32, 16)]
    assert engine.prefill(torch.randint(4, 100, (1, 64))).layout.block_size == 16  # alone, too
    glob = tool.StarEngine(model, attention="global", sizes=lambda n: (n // 4, 0))  # global: one block anyway
    assert [c.layout.num_blocks for c in glob.prefill([torch.randint(4, 100, (1, n)) for n in (96, 160)]).sequences] \
        == [1, 1]
