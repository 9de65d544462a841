"""KV storage for Star Attention: each host's context KV, and the query host's growing query KV.

``ContextKV`` is what phase 1 leaves behind: per layer, this host's own blocks' KV (the anchor's KV is
never kept: in ``"broadcast"`` mode it is never held, in ``"recompute"`` mode its rows are dropped).
It is read-only afterwards, so one context answers any number of queries.

``QueryKV`` holds the KV of the query and generated tokens on the query host (every layer), in
buffers allocated once per request for the whole request (query plus the most tokens it may
generate) and grown by doubling if that is exceeded, never by concatenation per token.
"""

from __future__ import annotations

import torch


class ContextKV:
    """Per-layer context KV ``(B, Hkv, L_own, D)`` of this host."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k, v

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer], self.v[layer]
        assert k is not None and v is not None, f"layer {layer} has no context KV: run prefill first"
        return k, v

    @property
    def num_tokens(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class QueryKV:
    """Per-layer KV of the query and generated tokens, appended in place."""

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = max(1, capacity)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = [0] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v: (B, Hkv, n, D)``; returns views of everything held for the layer."""
        n, used = k.shape[2], self.length[layer]
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or used + n > buf_k.shape[2]:
            size = max(self.capacity, 2 * (buf_k.shape[2] if buf_k is not None else 0), used + n)
            new_k = k.new_empty((k.shape[0], k.shape[1], size, k.shape[3]))
            new_v = v.new_empty((v.shape[0], v.shape[1], size, v.shape[3]))
            if used:
                new_k[:, :, :used], new_v[:, :, :used] = buf_k[:, :, :used], buf_v[:, :, :used]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, used:used + n] = k
        buf_v[:, :, used:used + n] = v
        self.length[layer] = used + n
        return buf_k[:, :, :used + n], buf_v[:, :, :used + n]
