"""The float64 oracle: dense attention under an explicit mask, and Star Attention's mask ``M_star``.

Star Attention over a whole model equals the ordinary model run once over ``[context ; query]`` with
the block-sparse mask ``M_star`` (``docs/design.md``, section 2). For context ``c`` (``Lc`` tokens, blocks
of ``b``, anchor of ``a``) followed by ``Lq`` query tokens, row = query token, column = key token::

                   B_0     B_1     B_2    query
                 a.....  ......  ......   ....
        B_0      \\
                 xx\\
        B_1      xx      \\                        x = anchor columns (first a tokens)
                 xx      xx\\                      \\ = causal inside the block
        B_2      xx              \\
                 xx              xx\\
        query    xxxxxx  xxxxxx  xxxxxx   \\        every earlier token
                 xxxxxx  xxxxxx  xxxxxx   xx\\

This module is the readable reference; fast paths never import it.
"""

from __future__ import annotations

import torch


def star_mask(context_len: int, block_size: int, anchor_size: int, query_len: int = 0,
              device: torch.device | str | None = None) -> torch.Tensor:
    """``M_star`` as a bool tensor ``(L, L)``, ``L = context_len + query_len``; True = may attend."""
    n = context_len + query_len
    idx = torch.arange(n, device=device)
    row, col = idx.unsqueeze(1), idx.unsqueeze(0)
    causal = col <= row
    row_block, col_block = row // block_size, col // block_size
    in_context = row < context_len
    same_block = row_block == col_block
    anchor = (col < min(anchor_size, context_len)) & (row_block > 0)
    return causal & ((in_context & (same_block | anchor)) | ~in_context)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float64 with autograd: returns ``(out, lse)`` in float64.

    ``q: (B, H, Sq, D)``, ``k, v: (B, Hkv, Sk, D)`` (GQA by repeating KV heads), ``mask: (Sq, Sk)``
    bool (True = attend) or None. Fully masked rows give ``out = 0`` and ``lse = -inf``.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe.unsqueeze(-1))
    return torch.matmul(p, v), lse


def star_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, context_len: int, block_size: int,
                   anchor_size: int, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Star Attention layer over ``[context ; query]`` (all tokens in q, k, v), in float64."""
    total = q.shape[2]
    mask = star_mask(context_len, block_size, anchor_size, total - context_len, device=q.device)
    return reference_attention(q, k, v, mask, scale)
