"""The reference model shipped inside the package: it loads offline in the transformers layout, and it
answers the evaluation's tasks, with global and Star attention, in one and two processes."""

import json
import os

import pytest

import workers
from star_sp import reference_model_path
from star_sp.apps.cli import main
from star_sp.eval.runner import MARGIN_TOKENS, answer_budget

REFERENCE = reference_model_path()


def test_it_loads_offline_within_the_size_limit(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(REFERENCE)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    assert model.config.model_type == "llama" and model.config.max_position_embeddings >= 16384
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id  # a context starts with <s>
    size = sum(os.path.getsize(os.path.join(REFERENCE, f)) for f in os.listdir(REFERENCE))
    assert size <= 30 * 2**20
    recipe = json.load(open(os.path.join(REFERENCE, "recipe.json")))
    assert recipe["args"]["max_length"] >= 16384 and recipe["final_log"]["answer_loss"] < 1.0


def test_the_anchor_tuned_model_ships_beside_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    from star_sp import StarInputError
    from star_sp.models import resolve_model

    tuned = reference_model_path("anchor")
    assert resolve_model("reference-anchor") == tuned and tuned != REFERENCE
    files = os.listdir(tuned)
    assert sum(os.path.getsize(os.path.join(tuned, f)) for f in files if f.startswith("model.")) <= 15 * 2**20
    config = AutoConfig.from_pretrained(tuned)
    assert str(config.dtype).removeprefix("torch.") == "bfloat16"
    assert config.num_hidden_layers == AutoConfig.from_pretrained(REFERENCE).num_hidden_layers
    recipe = json.load(open(os.path.join(tuned, "recipe.json")))
    assert recipe["run"] == "star" and recipe["config"]["attention"] == "star"
    with open(os.path.join(tuned, "training_log.jsonl")) as f:
        assert json.loads(f.read().splitlines()[-1])["step"] == recipe["step"]
    with pytest.raises(StarInputError, match="choose one of"):
        reference_model_path("tuned")


def _argv(out, *extra):
    return ["--model", "reference", "--tasks", "niah_single_2,niah_multikey_1", "--lengths", "700",
            "--attention", "global,star", "--block-size", "1/2", "--anchor-size", "block", "--samples", "2",
            "--dtype", "float32", "--quiet", "--out", str(out), *extra]


def _rows(out):
    with open(out / "results.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_it_retrieves_with_global_and_star_in_one_and_two_processes(tmp_path, cluster):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["eval", *_argv(one)]) == 0
    rows = _rows(one)
    assert len(rows) == 2 * 2 * 2  # tasks x samples x methods
    # the model was trained for these: every answer right, with both kinds of attention
    assert all(r["score"] == 100 for r in rows), [(r["method"], r["prediction"], r["answers"]) for r in rows]
    results = cluster(2).run(workers.cli, "eval", _argv(two))
    assert all(code == 0 for code, _, _ in results), results
    key = lambda r: (r["task"], r["index"], r["method"])  # noqa: E731
    assert {key(r): r["prediction"] for r in _rows(two)} == {key(r): r["prediction"] for r in rows}


def test_answer_budget_never_cuts_a_reference_answer_short():
    assert answer_budget("niah_single_1") == 32
    assert answer_budget("niah_single_1", answer_tokens=50) == 50 + MARGIN_TOKENS
    assert answer_budget("niah_single_3", answer_tokens=40) == 64
    assert answer_budget("vt", override=5, answer_tokens=50) == 5
