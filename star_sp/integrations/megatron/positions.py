"""Star's positions in a Megatron-core GPT model: ``StarRotary`` puts RoPE at each row's own position (the
forward plan's, or this CP rank's contiguous share in Megatron's own loop); ``use_star_positions(model)``
installs it. Positions ``[rows]`` give an embedding ``[rows, 1, 1, dim]``."""

from __future__ import annotations

import torch

from ...errors import StarInputError
from .attention import StarCoreAttention, current_plan, group_size


class StarRotary(torch.nn.Module):
    """Megatron's RoPE at each row's own position: the step's positions, or, in Megatron's own loop,
    this CP rank's contiguous share (Megatron's default slices the table zigzag under CP)."""

    def __init__(self, inner, context_parallel_size: int = 1):
        super().__init__()
        self.inner = inner
        self.cp = max(1, context_parallel_size)  # Megatron's rotary length is the local rows x this

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        step = current_plan()
        inv = self.inner.inv_freq
        if step is not None:
            positions = step.positions
        else:
            _, rank = group_size(self.inner.cp_group)
            share = max_seq_len // self.cp
            positions = torch.arange(rank * share, (rank + 1) * share) + offset
        seq = positions.to(device=inv.device, dtype=inv.dtype)
        if self.inner.seq_len_interpolation_factor is not None:
            seq = seq / self.inner.seq_len_interpolation_factor
        freqs = torch.outer(seq, inv)
        if self.inner.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.inner.get_rotary_seq_len(*args, **kwargs)


def use_star_positions(model) -> None:
    """Replace the GPT model's RoPE with ``StarRotary`` (once; idempotent). Refuses other position
    embeddings (learned absolute ones take ``position_ids`` as they are and need nothing)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    if not hasattr(model, "decoder") or not hasattr(model, "output_layer"):
        raise StarInputError(f"expected a Megatron-core GPTModel, got {type(model).__name__}: pass the model itself "
                             "(a wrapper's .module)")
    rope = getattr(model, "rotary_pos_emb", None)
    if isinstance(rope, StarRotary) or getattr(model, "position_embedding_type", "rope") == "learned_absolute":
        _mark(model)
        return
    if type(rope) is not RotaryEmbedding:
        raise StarInputError(f"Star Attention in Megatron supports position_embedding_type 'rope' (plain "
                             f"RotaryEmbedding) or 'learned_absolute', got {type(rope).__name__}")
    model.rotary_pos_emb = StarRotary(rope, getattr(model.config, "context_parallel_size", 1))
    if rope.inv_freq.device.type == "cpu":  # Megatron moves it to CUDA at first use; follow the model
        param = next(model.parameters(), None)
        if param is not None:
            rope.inv_freq = rope.inv_freq.to(param.device)
    _mark(model)


def _mark(model) -> None:
    """Tell the model's Star modules that its positions are Star's (the state belongs to the model: another
    model's call does not count for this one)."""
    for module in model.modules():
        if isinstance(module, StarCoreAttention):
            module.star_positions = True
