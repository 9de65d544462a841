"""Star Attention for Megatron-core GPT models. ``attention.py``: the core-attention module
(``StarCoreAttention``), its layer spec and the forward plan that tells it which rows are phase 1 and
which phase 2; ``positions.py``: RoPE at Star's positions; ``inference.py``: prefill, generation and the
one model forward; ``args.py``: the ``--attention star`` flags. megatron-core is imported lazily."""

from .attention import (ForwardPlan, StarCoreAttention, contiguous_share, group_size, require_megatron, running,
                        star_layer_spec)
from .inference import megatron_generate, megatron_prefill, model_device, model_forward
from .positions import StarRotary, use_star_positions

__all__ = ["ForwardPlan", "StarCoreAttention", "StarRotary", "contiguous_share", "group_size", "megatron_generate",
           "megatron_prefill", "model_device", "model_forward", "require_megatron", "running", "star_layer_spec",
           "use_star_positions"]
