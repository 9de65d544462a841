"""Star Attention for Megatron-core GPT models: the core-attention module and its layer spec
(``core.py``), Star's positions (``StarRotary``), prefill and generation over a Star context, and the
``--attention star`` flags (``args.py``). megatron-core is imported lazily."""

from .core import (ATTENTIONS, StarCoreAttention, StarRotary, contiguous_share, megatron_generate, megatron_prefill,
                   require_megatron, star_layer_spec, use_star_positions)

__all__ = ["ATTENTIONS", "StarCoreAttention", "StarRotary", "contiguous_share", "megatron_generate", "megatron_prefill",
           "require_megatron", "star_layer_spec", "use_star_positions"]
