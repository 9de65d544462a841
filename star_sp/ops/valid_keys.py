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

from .merge import accumulation_dtype


def valid_keys_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: (B, H, Sq, D)`` over ``k, v: (B, Hkv, Sk, D)`` (GQA: head ``h`` reads KV head
    ``h // (H / Hkv)``), keys where ``valid: (Sk,)`` (bool) is true. Returns ``(out, lse)``: ``out``
    ``(B, H, Sq, D)`` in q's dtype, ``lse: (B, H, Sq)`` in the accumulation dtype; rows with no valid
    key get ``out = 0, lse = -inf``. No autograd wanted (decode), no host synchronisation."""
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    grouped = q.reshape(b, hkv, (h // hkv) * sq, d).to(acc)  # consecutive heads share a KV head
    s = torch.matmul(grouped, k.to(acc).transpose(-1, -2)).mul_(scale)
    s.masked_fill_(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    s.sub_(torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)).exp_()
    out = torch.matmul(s, torch.where(valid.unsqueeze(-1), v.to(acc), 0.0))  # unwritten slots may hold NaN
    return out.reshape(b, h, sq, d).to(q.dtype), lse.reshape(b, h, sq)
