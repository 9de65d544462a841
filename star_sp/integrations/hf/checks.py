"""What a transformers model must be for Star Attention to run it exactly: checked up front, on every rank
alike, each refusal one line saying what to change."""

from __future__ import annotations

from ...errors import StarInputError


def check_model(model) -> None:
    """Raise ``StarInputError`` for a model whose attention Star Attention cannot honour."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is None or not hasattr(model, "base_model_prefix"):
        raise StarInputError(f"{name} is not a transformers model; StarEngine takes a *ForCausalLM model")
    if getattr(cfg, "is_encoder_decoder", False):
        raise StarInputError(f"{name} is an encoder-decoder model; Star Attention serves decoder-only causal LMs")
    if not getattr(model, "_supports_attention_backend", False):
        raise StarInputError(f"{name} computes attention in its own code (e.g. ALiBi or a custom kernel) rather "
                             "than through transformers' attention interface, so Star Attention cannot replace it")
    if getattr(cfg, "alibi", False) or "alibi" in str(getattr(cfg, "position_embedding_type", "")):
        raise StarInputError(f"{name} uses ALiBi position biases, which Star Attention does not support")
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise StarInputError(f"{name} has layers of type {sorted(layer_types - {'full_attention'})}; Star "
                             "Attention needs every layer to use full causal attention")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        raise StarInputError(f"{name} uses sliding-window attention (window {window}); Star Attention needs full "
                             "attention. If the checkpoint was trained without a window, set "
                             "config.sliding_window = None")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise StarInputError(f"{name} soft-caps attention logits, which Star Attention does not support")
    if not hasattr(model, "lm_head") and not hasattr(model, "get_output_embeddings"):
        raise StarInputError(f"{name} has no language-model head; pass a *ForCausalLM model")


def dropout_error(model) -> str | None:
    """Star Attention applies no attention dropout: a model in training mode with some is refused (checked
    up front, on every rank alike, not inside the first attention call that an idle host never makes)."""
    rate = getattr(model.config, "attention_dropout", 0.0) or 0.0
    if model.training and rate:
        return (f"the model is in training mode with attention_dropout={rate}, which Star Attention does not "
                "apply; set model.config.attention_dropout = 0.0 (or call model.eval() for inference)")
    return None


def model_spec(model) -> dict:
    """What a context's KV depends on besides the ids: checked when a context comes back to an engine."""
    cfg = model.config
    heads = cfg.num_attention_heads
    param = next(model.parameters())
    return {"layers": cfg.num_hidden_layers, "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device)}


def plain_head(model):
    """The model's output projection when its logits are exactly ``head(final hidden state)`` (no scaling
    or soft-capping of the logits), else None: a loss may then compute the logits a chunk at a time."""
    cfg = model.config
    if any(getattr(cfg, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    return model.get_output_embeddings()


def unwrap_adapters(model):
    """The transformers model inside a peft ``PeftModel`` (LoRA and the like inject their layers into it, so
    its forward is the adapted model's), or ``model`` itself."""
    get_base = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base) else model
