"""Tiny random-weight models with a word-level tokenizer, for tests and offline examples.

Awkward on purpose: GQA (4 query heads, 2 KV heads), head dim 12, 2 layers. Needs transformers.
"""

from __future__ import annotations

import torch

WORDS = ("the a of to and in is it that was he for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than "
         "first been its who now people my made over did down only way find use may water long little very "
         "after words called just where most know key value number secret city river").split()


def tiny_config(family: str, vocab_size: int, **overrides):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(overrides)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(**{"sliding_window": None, **common})
    raise ValueError(f"unknown family {family!r}; choose llama, qwen2, qwen3 or mistral")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS + [str(i) for i in range(10)] + list(".,?:;!'\""):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of ``family`` (eval mode) and its tokenizer."""
    import transformers

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), **overrides), dtype=dtype)
    return model.eval(), tokenizer


def save(path, family: str = "llama", seed: int = 0, *, tokenizer: bool = True, dtype: torch.dtype = torch.float32,
         **overrides) -> str:
    """Write a tiny model (and, unless ``tokenizer=False``, its tokenizer) to ``path``."""
    model, tok = build(family, seed, dtype, **overrides)
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return str(path)


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_norms(model):
    """Make the model's RMSNorms compute in the input's dtype. transformers' RMSNorm computes in
    float32 even for float64 weights, which caps a float64 comparison at float32 rounding (1e-7); with
    this, float64 runs that differ only in attention's summation order agree to about 1e-13."""
    import types

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model
