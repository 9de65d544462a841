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

    def drop(self, layer: int) -> None:
        """Let go of a layer's KV (a training forward, once the layer's phase 2 has read it)."""
        self.k[layer] = self.v[layer] = None

    @property
    def num_tokens(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class TrainingQueryKV:
    """The query host's query KV in a training forward: the target rows' own KV of each layer, passed
    through unchanged (kept in the autograd graph, never copied into a buffer)."""

    def __init__(self, num_layers: int):
        self.length = [0] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.length[layer] == 0, "a training forward passes the target rows once"
        self.length[layer] = k.shape[2]
        return k, v


class QueryKV:
    """Per-layer KV of the query and generated tokens, appended in place. ``starts (B,)``, for questions
    of different lengths left-padded to one: sequence ``b``'s first ``starts[b]`` tokens are padding,
    which no row attends."""

    def __init__(self, num_layers: int, capacity: int, starts: torch.Tensor | None = None):
        self.starts = starts
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


class StaticQueryKV(QueryKV):
    """A ``QueryKV`` whose buffers never move, for decode steps replayed as a CUDA graph.

    The eager query pass fills it through ``append`` (which refuses to grow past ``capacity``: the
    request's query plus its most new tokens). Then ``mark_filled`` copies the fill level to the device
    tensor ``filled``, and each decode step ``write``s its KV at that device-side position, attends the
    whole buffer with ``valid()`` as the mask (``ops.valid_keys``) and ends with ``advance`` (in the
    graph, so every replay moves on by itself). No Python number changes between replays.
    """

    def __init__(self, num_layers: int, capacity: int, device: torch.device, starts: torch.Tensor | None = None):
        super().__init__(num_layers, capacity, starts)
        self.filled = torch.zeros((), dtype=torch.long, device=device)
        self._steps = None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length[layer] + k.shape[2] > self.capacity:
            raise ValueError(f"the static query KV holds {self.capacity} tokens; {self.length[layer]} are used and "
                             f"{k.shape[2]} more were appended")
        return super().append(layer, k, v)

    def mark_filled(self) -> None:
        """Copy the eager fill level (every layer's) to ``filled``; call between the eager query pass and
        the first decode step."""
        self.filled.fill_(self.length[0])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one step's ``k, v: (B, Hkv, n, D)`` at positions ``filled .. filled + n - 1``; returns the
        whole buffers (their first ``filled + n`` tokens are valid). The caller checks the capacity: an
        index past it is a device-side error, which a graph cannot turn into a Python one."""
        n = k.shape[2]
        if self._steps is None or self._steps.numel() != n:
            self._steps = torch.arange(n, device=self.filled.device)
        at = self._steps + self.filled
        self.k[layer].index_copy_(2, at, k)
        self.v[layer].index_copy_(2, at, v)
        return self.k[layer], self.v[layer]

    def valid(self, n: int) -> torch.Tensor:
        """``(capacity,)`` bool: which buffer slots hold tokens once this step's ``n`` are written (``(B,
        capacity)`` with ``starts``: a sequence's padding is not valid)."""
        slots = torch.arange(self.k[0].shape[2], device=self.filled.device)
        valid = slots < self.filled + n
        if self.starts is not None:
            valid = valid[None, :] & (slots[None, :] >= self.starts[:, None])
        return valid

    def advance(self, n: int) -> None:
        self.filled.add_(n)
