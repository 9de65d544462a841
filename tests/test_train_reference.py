"""tools/train_reference.py end to end in its smoke size: it trains, logs and writes a model directory
that transformers and star-sp load offline."""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_training_writes_a_loadable_model(tmp_path):
    spec = importlib.util.spec_from_file_location("train_reference", os.path.join(ROOT, "tools", "train_reference.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = tmp_path / "ref"
    assert train.main(["--out", str(out), "--smoke", "--tasks", "niah_single,vt"]) == 0
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    recipe = json.loads((out / "recipe.json").read_text())
    w = recipe["args"]["context_weight"]
    # each row is one step here: its loss is the answer loss plus the weighted context loss
    assert rows and all(abs(r["loss"] - (r["answer_loss"] + w * r["context_loss"])) < 1e-4 for r in rows), rows
    assert recipe["tasks"] == ["niah_single_1", "niah_single_2", "niah_single_3", "vt"] and recipe["steps"] == len(rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from star_sp import StarConfig, StarEngine

    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("special magic number 4715")["input_ids"], skip_special_tokens=True).endswith("4715")
    engine = StarEngine(model, StarConfig(block_size=16, anchor_size=4))
    ids = torch.tensor([tok("The sky is blue. " * 10)["input_ids"]])
    tokens = engine.generate(engine.prefill(ids), torch.tensor([tok(" The", add_special_tokens=False)["input_ids"]]), 3)
    assert tokens.shape == (1, 3)


@pytest.mark.slow
def test_data_parallel_training_under_torchrun(tmp_path):
    """Two ranks draw different batches, average gradients and end with the same weights (the script
    checks that across ranks and raises otherwise); rank 0 alone writes the model and its recipe."""
    from test_launch import BIN, _launch, free_port

    out = tmp_path / "ref"
    proc = _launch([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "tools/train_reference.py", "--out", str(out), "--smoke", "--tasks", "niah_single,vt"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = json.loads((out / "recipe.json").read_text())
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert recipe["ranks"] == 2 and recipe["steps"] == len(rows) == 12
    tokens = [r["tokens"] for r in rows]
    assert recipe["tokens"] == tokens[-1] and all(a < b for a, b in zip([0] + tokens, tokens))
    assert (out / "model.safetensors").exists()


def _data():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import reference_data

    return reference_data


def test_training_examples_hold_their_answers_within_length():
    import random

    data = _data()
    tok = data.build_tokenizer(600, 0)
    encode = data.Encoder(tok)
    encode.check(0)  # chunked tokenization equals the tokenizer's on every task
    sizer = data.Sizer(encode, 0)
    rng = random.Random(1)
    from star_sp.eval import TASKS

    for task in TASKS:
        for length in (700, 1500):
            for drill in (0.0, 1.0):
                ids, roles, spans = data.make_example(encode, sizer, rng, length, [task], 0.0, drill, 4)
                assert len(ids) == len(roles) <= length and ids[0] == tok.bos_token_id
                assert spans and all(end <= len(ids) for _, end, _ in spans), (task, length, drill)
                for begin, end, name in spans:
                    assert name == task and all(roles[begin:end]) and ids[end - 1] == tok.eos_token_id
                    text = tok.decode(ids[begin:end - 1])
                    assert text.startswith(" ") and text.endswith(".")
                assert sum(roles) == sum(end - begin for begin, end, _ in spans)
                if drill and task in data.DRILLS and length == 1500:
                    assert len(spans) >= 2  # a drill asks several questions of one context
    # a length too short for a word list's sample with its answer draws the tasks that fit instead
    assert not sizer.fits("cwe", 200) and sizer.fits("niah_single_1", 200)
    for _ in range(5):
        ids, roles, spans = data.make_example(encode, sizer, rng, 200, ["cwe", "niah_single_1"], 0.0, 0.0, 1)
        assert [name for _, _, name in spans] == ["niah_single_1"]
    # prose: no answers, every token a context token
    ids, roles, spans = data.make_example(encode, sizer, rng, 300, ["vt"], 1.0, 0.0, 4)
    assert len(ids) == 300 and not any(roles) and spans == []
