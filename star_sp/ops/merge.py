"""The log-sum-exp merge of partial attention results.

Attention of query rows over a key set ``K`` split into disjoint parts ``K_1 .. K_n`` is recovered from
the parts' results ``(O_i, s_i)``, where ``O_i`` is softmax attention over ``K_i`` alone and ``s_i`` its
row-wise log-sum-exp of scaled scores (natural log, base e)::

    m = max_i s_i
    w_i = exp(s_i - m)
    O = sum_i w_i * O_i / sum_i w_i
    s = m + log(sum_i w_i)

A part over no keys has ``s_i = -inf`` in its rows and contributes nothing; a row that is ``-inf`` in
every part gives ``O = 0`` and ``s = -inf``, never NaN (``merge_shift`` and ``merge_finish``, the two
steps that handle such rows, are shared with the all-reduce form). The same function serves phase 1
(anchor plus local block), phase 2 (hosts, through its all-reduce form) and the ring baseline.
``merge_into_`` is its in-place two-term form for forward passes that keep no graph (on CUDA one fused
Triton kernel, ``merge_fused.py``, which writes the same formula out per row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .merge_fused import merge_into_fused


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges and log-sum-exps are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_shift(m: torch.Tensor) -> torch.Tensor:
    """The shift ``m`` of the merge, from the row-wise maximum of the parts' log-sum-exps: 0 in rows
    where every part is ``-inf`` (no keys anywhere), so that ``exp(s_i - m)`` is 0 there, not NaN."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def merge_finish(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``O = num / den`` and ``s = m + log(den)`` from ``num = sum_i w_i O_i: (..., S, D)`` and
    ``den = sum_i w_i: (..., S)`` (``w_i = exp(s_i - m)``). A row with ``den = 0`` (no keys in any part)
    gets ``O = 0`` and ``s = -inf``; the backward stays free of ``0 * inf`` there."""
    has_keys = den > 0
    den = torch.where(has_keys, den, torch.ones_like(den))
    lse = torch.where(has_keys, m + torch.log(den), torch.full_like(den, float("-inf")))
    return num / den.unsqueeze(-1), lse


def merge_partials(partials: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results ``(out_i, lse_i)`` over disjoint key sets into ``(out, lse)``.

    ``lse_i`` are natural-log (base e) log-sum-exps of the scaled scores, as every kernel here returns
    them. Shapes: ``out_i`` is ``(..., S, D)``, ``lse_i`` is ``(..., S)``, all alike. The merge runs in
    float32 (float64 for float64 inputs); ``out`` comes back in the dtype of ``out_0`` and ``lse`` in
    the accumulation dtype. Pure torch operations, so gradients flow to every ``out_i`` and ``lse_i``.
    """
    if not partials:
        raise ValueError("merge_partials needs at least one partial result")
    out_dtype = partials[0][0].dtype
    acc = accumulation_dtype(out_dtype)
    lses = torch.stack([lse.to(acc) for _, lse in partials])
    m = merge_shift(lses.amax(dim=0))
    w = torch.exp(lses - m)
    num = sum(wi.unsqueeze(-1) * out.to(acc) for wi, (out, _) in zip(w, partials))
    out, lse = merge_finish(num, w.sum(dim=0), m)
    return out.to(out_dtype), lse


def merge_into_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge one more partial ``(out, lse)`` into the running ``(out_acc, lse_acc)``, in place.

    ``out_acc: (..., S, D)`` and ``lse_acc: (..., S)`` are in the accumulation dtype (rows never merged
    hold ``out_acc = 0, lse_acc = -inf``); ``out, lse`` may be lower precision. Same result as
    ``merge_partials`` on the two (the formula above with ``n = 2``), without building a graph (call it
    where no gradient flows through the merge, e.g. inside an autograd function's forward). A row that
    is ``-inf`` in both stays ``O = 0, s = -inf``.

    On CUDA with Triton this is one fused kernel (``merge_fused``: float32 arithmetic, one rounding to
    ``out_acc``'s dtype); elsewhere (and for float64) ``merge_into_torch_``."""
    if not merge_into_fused(out_acc, lse_acc, out, lse):
        merge_into_torch_(out_acc, lse_acc, out, lse)


def merge_into_torch_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """``merge_into_`` on any device and dtype: ``merge_partials`` of the two, written back. Rows never
    merged must hold ``out_acc = 0`` (a weight of 0 does not cancel NaN garbage)."""
    merged, new = merge_partials([(out_acc, lse_acc), (out, lse)])
    out_acc.copy_(merged)
    lse_acc.copy_(new)
