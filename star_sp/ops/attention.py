"""``attention_with_lse``: attention that also returns the row-wise log-sum-exp, with autograd."""

from __future__ import annotations

import math

import torch

from .backends import check_qkv, select_kernel
from .parts import Part, parts_attention


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def key_parts(row_start: int, row_end: int, k: torch.Tensor, v: torch.Tensor, causal: bool) -> list[Part]:
    """Parts for rows ``[row_start, row_end)`` over all of ``k, v``, the causal mask aligned bottom-right.

    With ``Sq`` rows and ``Sk >= Sq`` keys, row ``i`` sees keys ``0 .. Sk - Sq + i`` (the keys of a
    cache that ends with the rows' own tokens)::

        Sq = 2, Sk = 5:   row 0   x x x x .        = unmasked prefix  [x x x]
                          row 1   x x x x x          + square causal  [x .]
                                                                      [x x]
    Empty key sets give no part.
    """
    rows, sk = row_end - row_start, k.shape[2]
    if rows == 0 or sk == 0:
        return []
    if not causal or rows == 1:  # one row at the bottom-right sees every key
        return [Part(row_start, row_end, k, v)]
    if sk < rows:
        raise ValueError(f"causal attention needs at least as many keys ({sk}) as query rows ({rows})")
    prefix = sk - rows
    parts = [Part(row_start, row_end, k[:, :, :prefix], v[:, :, :prefix])] if prefix else []
    return parts + [Part(row_start, row_end, k[:, :, prefix:], v[:, :, prefix:], causal=True)]


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, differentiable in both outputs.

    Shapes: ``q: (B, H, Sq, D)``, ``k, v: (B, Hkv, Sk, D)`` with ``H % Hkv == 0`` (GQA). Returns
    ``out: (B, H, Sq, D)`` in q's dtype and ``lse: (B, H, Sq)`` (natural log; float32, or float64 for
    float64 input). ``causal=True`` aligns the mask bottom-right (see ``key_parts``), which for
    ``Sq == Sk`` is the ordinary causal mask. With ``Sk == 0`` every row has ``lse = -inf`` and
    ``out = 0``.
    """
    check_qkv(q, k, v)
    kernel = select_kernel(backend, q, k)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return parts_attention(q, key_parts(0, q.shape[2], k, v, causal), kernel, scale)
