"""The model a ``star-sp`` command names with ``--model``: its config, its weights, its tokenizer.

Each problem a user can cause (no model, a directory without a config or weights, transformers not
installed) is a ``StarInputError`` of one line; a directory without tokenizer files is legal.
"""

from __future__ import annotations

import contextlib

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
    path = resolve_model(cfg.model, weights=not cfg.random_weights)
    try:
        return path, transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise StarInputError(f"cannot read the model config in {cfg.model}: {str(exc).splitlines()[0]}") from None


def load_model(cfg, path: str, config, device: torch.device, progress: bool = True):
    import transformers

    dtype = _dtype(cfg.dtype, device)
    try:
        if cfg.random_weights:
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
