"""Attention over the keys of a fixed-size buffer that a device-side mask marks valid.

A CUDA graph replays the same kernels on the same shapes, so a captured decode step cannot slice the
query KV to its current length (a Python number, frozen at capture). It attends the whole buffer
instead, with ``valid`` computed on the device from the number of tokens held::

    keys       k_0 k_1 ... k_(n-1) | k_n ... k_(capacity-1)
    valid       1   1  ...    1    |  0  ...      0           (n read from a device tensor)

Every query row attends every valid key: the causal mask of a decode step, whose one row is the
buffer's last valid token. Several rows would see each other (no mask among them), so callers pass
one row per sequence (``DecodeStepPass`` refuses more). The buffer is small (query plus generated
tokens), so plain matrix products in float32 cost nothing next to the context part, which goes
through the fused kernels.
"""

from __future__ import annotations

import torch

from .softmax import group_heads, softmax_lse


def valid_keys_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: (B, H, Sq, D)`` over ``k, v: (B, Hkv, Sk, D)`` (GQA: head ``h`` reads KV head
    ``h // (H / Hkv)``), keys where ``valid`` (bool) is true: ``(Sk,)`` for every row, ``(B, Sk)`` per
    sequence (questions of different lengths, left-padded), or ``(B, Sq, Sk)`` per row. Returns ``(out,
    lse)``: ``out (B, H, Sq, D)`` in q's dtype, ``lse: (B, H, Sq)`` in the accumulation dtype; rows with
    no valid key get ``out = 0, lse = -inf``. The softmax is ``ops/softmax.py``'s, with q and k in the
    accumulation dtype. No autograd wanted (decode), no host synchronisation."""
    if valid.dim() == 1:
        keep, written = valid, valid.unsqueeze(-1)
    else:
        keep = valid.unsqueeze(1) if valid.dim() == 3 else valid[:, None, None, :]  # (B, 1, Sq or 1, Sk)
        written = valid.reshape(valid.shape[0], -1, valid.shape[-1]).any(dim=1)[:, None, :, None]
    p, lse = softmax_lse(q, k, scale, keep, upcast=True)
    v = torch.where(written, v.to(p.dtype), 0.0)  # unwritten slots may hold NaN
    out = torch.matmul(group_heads(p, k.shape[1]), v)
    return out.view(q.shape).to(q.dtype), lse


def own_keys(starts: torch.Tensor, rows: int, keys: int) -> torch.Tensor:
    """``(B, rows, keys)`` bool: the causal mask of ``rows`` query rows over ``keys`` keys, aligned
    bottom-right, where sequence ``b``'s first ``starts[b]`` keys are padding (left-padded questions)."""
    col = torch.arange(keys, device=starts.device)
    row = torch.arange(rows, device=starts.device)
    causal = col[None, :] <= row[:, None] + (keys - rows)
    return causal[None] & (col[None, None, :] >= starts[:, None, None])
