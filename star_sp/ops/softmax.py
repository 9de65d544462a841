"""Softmax attention written out with matrix products, with its log-sum-exp: the one plain form.

Shared by the ``math`` kernel (``backends.MathKernel``) and the decode step's attention over a
fixed-size buffer (``valid_keys.valid_keys_attention``). For ``q: (B, H, Sq, D)`` and
``k: (B, Hkv, Sk, D)`` (GQA: query head ``h`` reads KV head ``h // (H / Hkv)``)::

    s   = scale * q @ k^T, -inf where keep is False     (B, H, Sq, Sk), accumulation dtype
    lse = logsumexp(s, dim=-1)                           (B, H, Sq), natural log
    p   = exp(s - lse)                                   0 in a row without keys (lse = -inf)

The float64 oracle (``reference.py``) writes the same math out separately on purpose: the code it
checks must not share its lines.
"""

from __future__ import annotations

import torch

from .merge import accumulation_dtype


def group_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, S, D) -> (B, Hkv, g*S, D)``: the ``g = H / Hkv`` query heads that read one KV head,
    stacked as rows (GQA without copying the KV)."""
    b, h, s, d = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * s, d)


def softmax_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities ``p: (B, H, Sq, Sk)`` (accumulation dtype: float32, float64 for float64 input)
    and ``lse: (B, H, Sq)``.

    ``keep``: bool, broadcastable to ``(Sq, Sk)`` (True = may attend), or None for no mask. ``lse``
    given: ``p`` is recomputed from it (a backward pass, where ``lse`` may belong to a larger, merged key
    set). ``upcast=False``: the product ``q @ k^T`` in the input dtype, then the softmax in the
    accumulation dtype (the plain low-precision implementation that tolerances are measured against);
    ``upcast=True``: ``q`` and ``k`` in the accumulation dtype first. No autograd graph is kept (the
    steps work in place)."""
    acc = accumulation_dtype(q.dtype)
    b, h, sq, _ = q.shape
    if upcast:
        q, k = q.to(acc), k.to(acc)
    s = torch.matmul(group_heads(q, k.shape[1]), k.transpose(-1, -2)).to(acc).mul_(scale)
    s = s.view(b, h, sq, k.shape[2])
    if keep is not None:
        s.masked_fill_(~keep, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # rows without keys: p = exp(-inf) = 0
    return s.sub_(shift.unsqueeze(-1)).exp_(), lse
