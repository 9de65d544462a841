"""Pure tensor math of Star Attention: kernels with log-sum-exp, the merge, phases, the oracle.

Nothing here communicates: no collective, no process group (``docs/design.md``, section 3).
"""

from .attention import attention_with_lse, default_scale, key_parts
from .backends import KERNELS, Kernel, check_qkv, select_kernel
from .merge import accumulation_dtype, merge_partials
from .parts import Part, Reducer, parts_attention
from .reference import reference_attention, star_mask, star_reference
from .ring import ring_parts
from .star import local_attention, phase1_parts, phase2_local, phase2_parts, star_attention

__all__ = [
    "KERNELS", "Kernel", "Part", "Reducer", "accumulation_dtype", "attention_with_lse", "check_qkv",
    "default_scale", "key_parts", "local_attention", "merge_partials", "parts_attention", "phase1_parts",
    "phase2_local", "phase2_parts", "reference_attention", "ring_parts", "select_kernel", "star_attention", "star_mask", "star_reference",
]
