"""Models shipped with star-sp.

``reference``: the project's own long-context reference model (``tools/train_reference.py``): a
Llama-architecture model of 5.6M parameters (hidden 256, 6 layers, 8 query / 2 KV heads, 64K
positions, rope theta 1e6), a 4096-token byte-level BPE tokenizer, bf16 safetensors (11 MB), trained
with global attention on the RULER-style task families of ``star_sp.eval`` and generated prose, last
at 16K tokens. ``recipe*.json`` and ``training_log*.jsonl`` beside the weights record how.
It loads offline::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from .. import reference_model_path

    model = AutoModelForCausalLM.from_pretrained(reference_model_path())
    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())

The command line takes ``--model reference`` for it.

``smollm2``: a real pretrained model, SmolLM2-135M-Instruct, from an optional package, converted once
into a cache folder (``smollm2.py``; ``smollm2()``, ``--model smollm2``).

``reference-anchor``: the same model fine-tuned under the anchor pattern (Star Attention's phase 1,
random block and anchor sizes per sample) with ``tools/finetune_reference.sh``; ``reference_model_path
("anchor")``, ``--model reference-anchor``. Its ``recipe.json`` and ``training_log.jsonl`` record how.
"""

from __future__ import annotations

import os

from ..errors import StarInputError
from .smollm2 import smollm2

_HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = {"reference": os.path.join(_HERE, "reference"), "reference-anchor": os.path.join(_HERE, "reference-anchor")}
VARIANTS = {"": "reference", "anchor": "reference-anchor"}


def reference_model_path(variant: str = "") -> str:
    """The directory of a shipped reference model (transformers layout): ``""`` the reference model,
    ``"anchor"`` the one fine-tuned under the anchor pattern."""
    if variant not in VARIANTS:
        raise StarInputError(f"no shipped reference model {variant!r}; choose one of "
                             f"{', '.join(repr(v) for v in VARIANTS)}")
    path = SHIPPED[VARIANTS[variant]]
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise StarInputError(f"the reference model's weights are missing from {path}: reinstall star-sp "
                             "(the package data was not installed)")
    return path


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Files, one of which a model directory in the transformers layout holds its weights in."""


def resolve_model(name: str, *, weights: bool = True) -> str:
    """The directory of the model ``name``: a shipped model (``reference``, ``reference-anchor``), a directory in the
    transformers layout, or a hub-style name (``org/model``) already in the local hub cache.

    Raises ``StarInputError`` naming what is missing: the directory, its ``config.json``, or (when
    ``weights``) its weight files. Nothing is downloaded.
    """
    if name in SHIPPED and not os.path.isdir(name):
        return reference_model_path({v: k for k, v in VARIANTS.items()}[name])
    if name == "smollm2" and not os.path.isdir(name):
        return smollm2()
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        path = _cached_hub_model(name)
    if path is None:
        what = "is a file, not a directory" if os.path.exists(name) else "does not exist"
        raise StarInputError(f"model directory {name} {what}: pass a directory in the transformers layout "
                             "(config.json, weights, tokenizer), 'reference' (or 'reference-anchor') for a model shipped "
                             "with star-sp, or 'smollm2' (a real model from an optional package)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StarInputError(f"model directory {name} has no config.json: it is not a model in the transformers "
                             "layout (save one with model.save_pretrained(DIR))")
    if weights and not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise StarInputError(f"model directory {name} has no weights ({' or '.join(WEIGHT_FILES[::2])}): add "
                             "them, or pass --random-weights to run the model with random weights (timings only)")
    return path


def _cached_hub_model(name: str) -> str | None:
    """The local snapshot of hub model ``org/model`` if the hub cache holds one (no network)."""
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not installed, not a valid name, or not cached: no such model here
        return None
