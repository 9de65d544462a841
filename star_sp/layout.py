"""Which tokens, positions and blocks each host owns (``BlockLayout``).

A context of ``Lc`` tokens is cut into ``n = ceil(Lc / b)`` blocks; the last may be shorter and is
never padded. Rank ``r`` of ``N`` owns the contiguous run of blocks ``[r*n//N, (r+1)*n//N)``. This
split is balanced to one block, always gives the final block to the last rank (the query host), and
leaves some ranks idle (no blocks, empty cache) when ``N > n``. Example, ``n = 2`` and ``N = 4``::

    rank:    0      1      2      3
    blocks:  -     B_0     -     B_1      (ranks 0 and 2 idle; rank 3 is the query host)

Token positions are the tokens' indices in the context: block ``i`` holds positions
``i*b .. i*b + |B_i| - 1``. The anchor is the first ``min(a, |B_0|)`` tokens, positions ``0 .. a-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .config import StarConfig, check_block_anchor
from .errors import StarInputError


def _check_split(layout) -> None:
    """The one check of a layout's ``context_len``, ``world_size`` and ``rank``: positive integers, the rank
    inside the group. Raises ``StarInputError`` naming the value."""
    for name in ("context_len", "world_size"):
        value = getattr(layout, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            hint = " (the context is empty: give at least one token)" if name == "context_len" else ""
            raise StarInputError(f"{name} must be a positive integer, got {value!r}{hint}")
    if isinstance(layout.rank, bool) or not isinstance(layout.rank, int) or not 0 <= layout.rank < layout.world_size:
        raise StarInputError(f"rank must be in [0, {layout.world_size}), got {layout.rank!r}")


@dataclass(frozen=True)
class BlockLayout:
    """The split of one context over the ranks of a group, seen from one rank."""

    context_len: int
    block_size: int
    anchor_size: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        _check_split(self)
        check_block_anchor(self.block_size, self.anchor_size)

    @classmethod
    def from_config(cls, config: StarConfig, context_len: int, world_size: int = 1, rank: int = 0) -> "BlockLayout":
        return cls(context_len, config.block_size, config.anchor, world_size, rank)

    def for_rank(self, rank: int) -> "BlockLayout":
        return BlockLayout(self.context_len, self.block_size, self.anchor_size, self.world_size, rank)

    # -- blocks -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return -(-self.context_len // self.block_size)

    def block_range(self, i: int) -> tuple[int, int]:
        """Token range ``[start, end)`` of block ``i`` in the context."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range [0, {self.num_blocks})")
        start = i * self.block_size
        return start, min(start + self.block_size, self.context_len)

    def blocks_of(self, rank: int) -> range:
        n, N = self.num_blocks, self.world_size
        return range(rank * n // N, (rank + 1) * n // N)

    @cached_property
    def blocks(self) -> range:
        """Indices of the blocks this rank owns (possibly empty)."""
        return self.blocks_of(self.rank)

    @cached_property
    def block_lengths(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in map(self.block_range, self.blocks))

    # -- tokens -------------------------------------------------------------------------------

    @cached_property
    def token_range(self) -> tuple[int, int]:
        """Context tokens ``[start, end)`` this rank owns; ``start == end`` on an idle rank."""
        if not self.blocks:
            start = min(self.blocks.start * self.block_size, self.context_len)
            return start, start
        return self.block_range(self.blocks[0])[0], self.block_range(self.blocks[-1])[1]

    @property
    def num_tokens(self) -> int:
        start, end = self.token_range
        return end - start

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a tensor that spans the whole context along ``dim`` (a view)."""
        if x.shape[dim] != self.context_len:
            raise StarInputError(
                f"expected {self.context_len} context tokens along dim {dim}, got {x.shape[dim]}"
            )
        start, end = self.token_range
        return x.narrow(dim, start, end - start)

    # -- roles --------------------------------------------------------------------------------

    @property
    def is_idle(self) -> bool:
        return not self.blocks

    @property
    def is_query_host(self) -> bool:
        """The last rank: it holds the final block and the query and generated tokens' KV."""
        return self.rank == self.world_size - 1

    @cached_property
    def anchor_owner(self) -> int:
        """The rank that owns block 0, and so computes the anchor's KV anyway."""
        return next(r for r in range(self.world_size) if 0 in self.blocks_of(r))

    @property
    def owns_anchor(self) -> bool:
        return self.rank == self.anchor_owner

    @property
    def anchor_len(self) -> int:
        """Tokens in the anchor: ``min(anchor_size, |B_0|)``."""
        return min(self.anchor_size, self.context_len)

    @property
    def needs_anchor(self) -> bool:
        """True when this rank encodes blocks behind an anchor it does not own."""
        return not self.is_idle and not self.owns_anchor and self.anchor_len > 0

    def anchor_rows(self, recompute: bool) -> int:
        """Leading rows of this rank's phase-1 sequence that are anchor tokens (recompute mode only)."""
        return self.anchor_len if recompute and self.needs_anchor else 0

    def positions(self, recompute: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
        """Position ids of the sequence this rank encodes in phase 1: ``[0 .. a-1 ;] own tokens``."""
        start, end = self.token_range
        own = torch.arange(start, end, device=device)
        if self.anchor_rows(recompute):
            return torch.cat([torch.arange(self.anchor_len, device=device), own])
        return own


@dataclass(frozen=True)
class RingLayout:
    """The load-balanced (zigzag) split of one sequence for exact ring attention, seen from one rank.

    ``L`` tokens are cut into ``2N`` chunks, chunk ``j`` holding ``[j*L//(2N), (j+1)*L//(2N))``; rank
    ``r`` holds chunks ``r`` and ``2N-1-r``, in that order, so that under the causal mask every rank
    does the same work. Example, ``N = 2``::

        chunks:  c0  c1  c2  c3        rank 0: [c0 ; c3]     rank 1: [c1 ; c2]

    A rank's rows (and keys) are its two chunks concatenated; chunks may differ in length by one. Every
    chunk holds a token: ``L >= 2N`` is required.
    """

    context_len: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        _check_split(self)
        if self.context_len < 2 * self.world_size:
            raise StarInputError(f"ring attention over {self.world_size} ranks needs at least {2 * self.world_size} "
                                 f"tokens (two chunks per rank), got {self.context_len}")

    def for_rank(self, rank: int) -> "RingLayout":
        return RingLayout(self.context_len, self.world_size, rank)

    def chunk_range(self, j: int) -> tuple[int, int]:
        n = 2 * self.world_size
        return j * self.context_len // n, (j + 1) * self.context_len // n

    def chunks_of(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.world_size - 1 - rank

    def rows_of(self, rank: int) -> list[tuple[int, int, int]]:
        """``(chunk, first row, row count)`` of each of ``rank``'s chunks in its concatenated rows."""
        out, row = [], 0
        for j in self.chunks_of(rank):
            start, end = self.chunk_range(j)
            out.append((j, row, end - start))
            row += end - start
        return out

    def num_tokens_of(self, rank: int) -> int:
        return sum(n for _, _, n in self.rows_of(rank))

    @property
    def num_tokens(self) -> int:
        return self.num_tokens_of(self.rank)

    @property
    def is_query_host(self) -> bool:
        """The last rank: in the engine it holds the query and generated tokens' KV, as under Star."""
        return self.rank == self.world_size - 1

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Position ids of this rank's rows."""
        return torch.cat([torch.arange(*self.chunk_range(j), device=device) for j in self.chunks_of(self.rank)])

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's rows of a tensor that spans the whole sequence along ``dim`` (a copy)."""
        if x.shape[dim] != self.context_len:
            raise StarInputError(f"expected {self.context_len} tokens along dim {dim}, got {x.shape[dim]}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in map(self.chunk_range, self.chunks_of(self.rank))], dim)
