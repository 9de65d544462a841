"""transformers' extension points for Star Attention: one attention function registered under the name
``"star"`` (``AttentionInterface``), and a cache object that hands the attention module's KV to the pass
(``runtime/passes.py``) that runs the forward. Under activation checkpointing transformers gives the
layers no cache; the attention function then hands the KV to the pass itself.

Shapes: the attention function takes ``query (B, H, S, D)``, ``key, value (B, Hkv, S', D)`` and returns
``(out (B, S, H, D), None)``. It builds Star's masks itself (no mask function is registered): the pass
knows the phase, the rows' blocks and the left padding of several questions.
"""

from __future__ import annotations

import torch

from ...errors import StarInputError

ATTENTION_NAME = "star"


@torch.compiler.disable  # compiled layers (StarConfig.compile) run Star's attention as it is, between two graphs
def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: ``query (B, H, S, D)``, ``key, value (B, Hkv, S', D)`` ->
    ``(out (B, S, H, D), None)``. The ``star`` keyword carries the pass that knows the phase."""
    state = kwargs.get("star")
    if state is None:
        raise StarInputError("attn_implementation 'star' runs only inside star_sp.StarEngine (it needs the "
                             "engine's per-pass state); use the engine's prefill/score/generate")
    if dropout:
        raise StarInputError("attention dropout is not supported under Star Attention; set "
                             "model.config.attention_dropout = 0.0 (or call model.eval() for inference)")
    layer = module.layer_idx
    if getattr(state, "cache_updated", None) != layer:  # activation checkpointing: the layer got no cache
        key, value = state.update(key, value, layer)
    state.cache_updated = None
    return state.attend(layer, query, key, value, scaling).transpose(1, 2), None


class TransformersCache:
    """transformers' cache protocol around a pass (``runtime/passes.py``): the attention module calls
    ``update(k, v, layer_idx, cache_kwargs)`` before the attention function, and the model asks
    ``get_seq_length()`` for the rows' positions; KV policy stays in the pass."""

    is_compileable = False

    def __init__(self, state):
        self.state = state

    # compiled layers: the pass's KV bookkeeping runs as it is (traced, it recompiled for each pass type)
    @torch.compiler.disable
    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.state.cache_updated = layer_idx  # the attention function then knows the KV went through the pass
        return self.state.update(k, v, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.state.seq_length(layer_idx)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
