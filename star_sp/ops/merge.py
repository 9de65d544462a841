"""The log-sum-exp merge of partial attention results.

Attention of query rows over a key set ``K`` split into disjoint parts ``K_1 .. K_n`` is recovered from
the parts' results ``(O_i, s_i)``, where ``O_i`` is softmax attention over ``K_i`` alone and ``s_i`` its
row-wise log-sum-exp of scaled scores (natural log, base e)::

    m = max_i s_i
    w_i = exp(s_i - m)
    O = sum_i w_i * O_i / sum_i w_i
    s = m + log(sum_i w_i)

A part over no keys has ``s_i = -inf`` in its rows and contributes nothing; a row that is ``-inf`` in
every part gives ``O = 0`` and ``s = -inf``, never NaN. The same function serves phase 1 (anchor plus
local block), phase 2 (hosts, through its all-reduce form) and the ring baseline. ``merge_into_`` is
its in-place two-term form for forward passes that keep no graph (a handful of kernels, no copies; one
fused kernel on CUDA, ``merge_fused.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .merge_fused import merge_into_fused


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges and log-sum-exps are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_partials(partials: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results ``(out_i, lse_i)`` over disjoint key sets into ``(out, lse)``.

    Shapes: ``out_i`` is ``(..., S, D)``, ``lse_i`` is ``(..., S)``, all alike. The merge runs in
    float32 (float64 for float64 inputs); ``out`` comes back in the dtype of ``out_0`` and ``lse`` in
    the accumulation dtype. Pure torch operations, so gradients flow to every ``out_i`` and ``lse_i``.
    """
    if not partials:
        raise ValueError("merge_partials needs at least one partial result")
    out_dtype = partials[0][0].dtype
    acc = accumulation_dtype(out_dtype)
    lses = torch.stack([lse.to(acc) for _, lse in partials])
    m = lses.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no keys at all
    w = torch.exp(lses - m)
    den = w.sum(dim=0)
    has_keys = den > 0
    den = torch.where(has_keys, den, torch.ones_like(den))  # keeps the backward free of 0 * inf
    num = sum(wi.unsqueeze(-1) * out.to(acc) for wi, (out, _) in zip(w, partials))
    out = num / den.unsqueeze(-1)
    lse = torch.where(has_keys, m + torch.log(den), torch.full_like(den, float("-inf")))
    return out.to(out_dtype), lse


def merge_into_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge one more partial ``(out, lse)`` into the running ``(out_acc, lse_acc)``, in place.

    ``out_acc: (..., S, D)`` and ``lse_acc: (..., S)`` are in the accumulation dtype (rows never merged
    hold ``out_acc = 0, lse_acc = -inf``); ``out, lse`` may be lower precision. Same result as
    ``merge_partials`` on the two, without building a graph (call it where no gradient flows through
    the merge, e.g. inside an autograd function's forward)::

        s = logaddexp(s_acc, s_new);  O = exp(s_acc - s) * O_acc + exp(s_new - s) * O_new

    A row that is ``-inf`` in both stays ``O = 0, s = -inf`` (its weights are NaN, replaced by 0).

    On CUDA with Triton this is one fused kernel (``merge_fused``: float32 arithmetic, one rounding to
    ``out_acc``'s dtype); elsewhere (and for float64) ``merge_into_torch_``."""
    if not merge_into_fused(out_acc, lse_acc, out, lse):
        merge_into_torch_(out_acc, lse_acc, out, lse)


def merge_into_torch_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``merge_into_`` as four torch operations, on any device and dtype. Rows never merged must hold
    ``out_acc = 0`` (a weight of 0 does not cancel NaN garbage)."""
    lse = lse.to(lse_acc.dtype)
    new = torch.logaddexp(lse_acc, lse)
    w_acc = torch.exp(lse_acc - new).nan_to_num_(0.0).unsqueeze(-1)
    w_new = torch.exp(lse - new).nan_to_num_(0.0).unsqueeze(-1)
    out_acc.mul_(w_acc).addcmul_(out, w_new)
    lse_acc.copy_(new)
