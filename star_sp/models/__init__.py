"""Models shipped with star-sp.

``reference``: the project's own long-context reference model (``tools/train_reference.py``): a
Llama-architecture model of 5.6M parameters (hidden 256, 6 layers, 8 query / 2 KV heads, 64K
positions, rope theta 1e6), a 4096-token byte-level BPE tokenizer, bf16 safetensors (11 MB), trained
with global attention on the RULER-style task families of ``star_sp.eval`` and generated prose, last
at 16K tokens. ``recipe*.json`` and ``training_log*.jsonl`` beside the weights record how.
It loads offline::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from star_sp import reference_model_path

    model = AutoModelForCausalLM.from_pretrained(reference_model_path())
    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())

The command line takes ``--model reference`` for it.
"""

from __future__ import annotations

import os

from ..errors import StarInputError

SHIPPED = {"reference": os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")}


def reference_model_path() -> str:
    """The directory of the shipped reference model (transformers layout)."""
    path = SHIPPED["reference"]
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise StarInputError(f"the reference model's weights are missing from {path}: reinstall star-sp "
                             "(the package data was not installed)")
    return path


def resolve_model(name: str | None) -> str | None:
    """``name`` unchanged, unless it names a shipped model and no such directory exists here."""
    if name in SHIPPED and not os.path.isdir(name):
        return reference_model_path() if name == "reference" else SHIPPED[name]
    return name
