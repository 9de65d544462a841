"""tools/train_reference.py end to end in its smoke size: it trains, logs and writes a model directory
that transformers and star-sp load offline."""

import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_training_writes_a_loadable_model(tmp_path):
    spec = importlib.util.spec_from_file_location("train_reference", os.path.join(ROOT, "tools", "train_reference.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = tmp_path / "ref"
    assert train.main(["--out", str(out), "--smoke", "--tasks", "niah_single,vt"]) == 0
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] > 0 and r["answer_loss"] is not None for r in rows)
    recipe = json.loads((out / "recipe.json").read_text())
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
