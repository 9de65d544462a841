"""The model a ``star-sp`` command names with ``--model``: its config, its weights, its tokenizer.

Each problem a user can cause (no model, a directory without a config or weights, transformers not
installed) is a ``StarInputError`` of one line; a directory without tokenizer files is legal. A peft
adapter directory (``adapter_config.json``, as the fine-tuning job's ``[lora]`` saves it) names its base
model: the command loads the base and merges the adapter into it.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from ..errors import StarInputError
from ..models import resolve_model


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """transformers' progress bars (\"Loading weights\") on or off inside the block, as before after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def model_config(cfg):
    """``(directory, transformers config)`` of the run's model; reads no weights."""
    try:
        import transformers
    except ImportError:
        raise StarInputError("transformers is not installed: pip install 'star-sp[transformers]'") from None
    if not cfg.model:
        raise StarInputError("no model given: pass --model PATH or set model in --config")
    base = None if cfg.random_weights else adapter_base(cfg.model)
    path = cfg.model if base else resolve_model(cfg.model, weights=not cfg.random_weights)
    try:
        return path, transformers.AutoConfig.from_pretrained(base or path)
    except (OSError, ValueError, KeyError) as exc:
        raise StarInputError(f"cannot read the model config in {cfg.model}: {str(exc).splitlines()[0]}") from None


def adapter_base(path: str) -> str | None:
    """The base model directory of a peft adapter directory, or None for any other path."""
    adapter = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter):
        return None
    try:
        with open(adapter) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise StarInputError(f"{adapter} cannot be read as a peft adapter config: {str(exc).splitlines()[0]}") from None
    if isinstance(base, str) and not os.path.isabs(base) and not os.path.isdir(base):
        base = os.path.join(path, base)  # relative to the adapter's folder
    if not isinstance(base, str) or not os.path.isdir(base):
        raise StarInputError(f"the adapter in {path} names the base model {base!r}, which is not a directory here; "
                             "set base_model_name_or_path in its adapter_config.json")
    return resolve_model(base)


def _with_adapter(model, path: str):
    try:
        from peft import PeftModel
    except ImportError:
        raise StarInputError(f"{path} is a peft adapter, which needs peft: pip install 'star-sp[lora]'") from None
    return PeftModel.from_pretrained(model, path).merge_and_unload()


def load_model(cfg, path: str, config, device: torch.device, progress: bool = True):
    import transformers

    dtype = _dtype(cfg.dtype, device)
    base = None if cfg.random_weights else adapter_base(path)
    try:
        if base:
            with _progress_bars(progress):
                model = transformers.AutoModelForCausalLM.from_pretrained(base, config=config, dtype=dtype)
            model = _with_adapter(model, path).to(device)
        elif cfg.random_weights:
            torch.manual_seed(cfg.seed)
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            with _progress_bars(progress):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
            model = model.to(device)
    except (OSError, ValueError, KeyError) as exc:
        raise StarInputError(f"cannot load a causal LM from {cfg.model}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a model directory without tokenizer files is legal
        return None
