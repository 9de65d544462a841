"""The local work of one step of exact ring attention (``star_sp.distributed.ring`` moves the KV).

With the zigzag ``RingLayout``, rank ``r`` holds query chunks ``a in {r, 2N-1-r}``; at ring step ``t``
it holds the keys of rank ``src = (r - t) mod N``, chunks ``b in {src, 2N-1-src}``. Under the causal
mask chunk ``a`` attends chunk ``b`` fully when ``b < a``, causally (square mask) when ``b == a``
(step 0 only), and not at all when ``b > a``::

    N = 2, rank 0 (chunks 0, 3):   step 0 (own keys 0, 3):    c0->c0 causal, c3->c0 full, c3->c3 causal
                                   step 1 (rank 1's 1, 2):    c3->c1 full, c3->c2 full
"""

from __future__ import annotations

import torch

from ..layout import RingLayout
from .parts import Part


def ring_parts(layout: RingLayout, src: int, k: torch.Tensor, v: torch.Tensor) -> tuple[list[Part], list[int]]:
    """The parts of this rank's rows over rank ``src``'s keys ``k, v: (B, Hkv, rows of src, D)``, and
    each part's first key row in ``k`` (where its key gradient belongs)."""
    parts, offsets = [], []
    for a, row, rows in layout.rows_of(layout.rank):
        for b, key_row, keys in layout.rows_of(src):
            if b > a:
                continue
            kb, vb = k[:, :, key_row:key_row + keys], v[:, :, key_row:key_row + keys]
            parts.append(Part(row, row + rows, kb, vb, causal=b == a))
            offsets.append(key_row)
    return parts, offsets
