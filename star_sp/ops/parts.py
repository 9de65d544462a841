"""Attention of one query tensor over several key sets, merged, as one autograd function.

A ``Part`` says: query rows ``[row_start, row_end)`` of ``q`` attend keys ``k, v`` (unmasked, or with
the causal mask aligned bottom-right: square, or with more keys than rows where the kernel aligns it
so). Parts may cover the same rows (their results are merged with the LSE merge, ``ops/merge.py``) or
different rows. ``fold > 1`` cuts the part's rows and keys into ``fold`` equal
consecutive chunks and lets chunk ``j`` of the rows attend chunk ``j`` of the keys only, as one kernel
call with the chunks in the batch dimension: this is how equal-sized Star blocks attend themselves
causally without a Python loop over blocks::

    fold = 3, causal:  rows  [ r0 | r1 | r2 ]      keys  [ k0 | k1 | k2 ]
                       r_j attends k_j under the causal mask; nothing else.

``reducer`` (optional) merges the result with other processes' results after the local merge; in
the backward pass it sums the gradient of the merged result over the processes (each process's
merged output depends on every process's parts) before the local parts' backward, so each process's
query gradient is its own keys' share. ``star_sp.distributed`` provides it, so this module needs no
collectives. The backward pass runs each part's kernel backward with the *merged* output and
log-sum-exp (ring-attention style), so no per-part statistics are kept; a gradient arriving on the
returned log-sum-exp is honoured exactly through one more kernel backward per part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import StarInputError
from .backends import Kernel
from .merge import accumulation_dtype, merge_into_
from .merge_fused import fused_merge_available


@dataclass(frozen=True, eq=False)
class Part:
    """Query rows ``[row_start, row_end)`` attend ``k, v: (B, Hkv, Sk, D)``."""

    row_start: int
    row_end: int
    k: torch.Tensor
    v: torch.Tensor
    causal: bool = False
    """Causal mask aligned bottom-right: row ``i`` of ``Sq`` sees keys ``0 .. Sk - Sq + i``. A part with
    more keys than rows runs only on kernels whose ``bottom_right_causal`` is true (``key_parts``
    splits such ranges into an unmasked prefix and a square causal part for the others)."""
    fold: int = 1
    ready: Callable[[], None] | None = None
    """Called just before the part's kernel runs: waits for keys still in flight (the anchor's KV
    arriving by broadcast), so that earlier parts' kernels overlap the transfer."""

    def __post_init__(self) -> None:
        rows, keys = self.row_end - self.row_start, self.k.shape[2]
        if rows <= 0 or keys <= 0:
            raise StarInputError(f"a Part needs rows and keys, got {rows} rows and {keys} keys; drop empty parts")
        if self.fold < 1 or rows % self.fold or keys % self.fold:
            raise StarInputError(f"fold {self.fold} must divide the part's {rows} rows and {keys} keys")
        if self.causal and keys < rows:
            raise StarInputError(f"a causal Part needs at least as many keys as rows, got {rows} rows and {keys} "
                                 "keys")


class Reducer(Protocol):
    """Merges a local ``(out, lse)`` with other processes'; sums the merged result's gradients over them."""

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def sum_output_grad(self, dout: torch.Tensor, dlse: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _fold(x: torch.Tensor, fold: int) -> torch.Tensor:
    """``(B, H, f*L, ...) -> (B*f, H, L, ...)``."""
    if fold == 1:
        return x
    b, h, s = x.shape[:3]
    return x.unflatten(2, (fold, s // fold)).transpose(1, 2).reshape(b * fold, h, s // fold, *x.shape[3:])


def _unfold(x: torch.Tensor, fold: int) -> torch.Tensor:
    """``(B*f, H, L, ...) -> (B, H, f*L, ...)``."""
    if fold == 1:
        return x
    bf, h, s = x.shape[:3]
    return x.unflatten(0, (bf // fold, fold)).transpose(1, 2).reshape(bf // fold, h, fold * s, *x.shape[3:])


def _check_alignment(kernel: Kernel, q, rows: int, keys: int, causal: bool) -> None:
    if causal and keys != rows and not kernel.bottom_right_causal(q.device, q.dtype):
        raise StarInputError(f"the {kernel.name} kernel does not align a causal mask bottom-right, but a part "
                             f"has {rows} rows and {keys} keys; build parts with ops.key_parts")


def coverage(part_rows, rows: int) -> tuple[int, bool]:
    """``(most, full)``: the most parts that share one query row (``most <= 1``: no row needs a merge),
    and whether every one of the ``rows`` query rows has a part."""
    events = sorted([(m[0], 1) for m in part_rows] + [(m[1], -1) for m in part_rows])  # an end sorts before a start
    most = depth = 0
    gap = False
    reached = 0  # rows [0, reached) covered so far
    for at, step in events:
        if depth == 0 and at > reached:
            gap = True
        depth += step
        most = max(most, depth)
        reached = max(reached, at) if depth == 0 else reached
    return most, not gap and reached >= rows


def output_buffers(q: torch.Tensor, part_rows, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The running ``(out_acc, lse_acc)`` for ``forward_into``: ``out_acc`` in q's memory layout (so the
    model's transpose back to ``(B, S, H, D)`` is free), uninitialised when every row gets exactly one part.

    Its dtype is q's when no row needs a merge, or when no row gets more than two parts and the merge
    is fused (one rounding per row: the same bits as a float32 accumulator); float32 otherwise."""
    most, full = coverage(part_rows, q.shape[2])
    acc = q.dtype if most <= 1 or (fused and most <= 2) else accumulation_dtype(q.dtype)
    # uninitialised only where nothing is merged into it: a part that overlaps another in part reads rows
    # that only the later part covers (the merge weights them by 0, but 0 * NaN garbage is NaN)
    out_acc = torch.empty_like(q, dtype=acc) if full and most <= 1 else torch.zeros_like(q, dtype=acc)
    lse_acc = q.new_full(q.shape[:3], float("-inf"), dtype=accumulation_dtype(q.dtype))
    return out_acc, lse_acc


def forward_into(q, part_rows, part_keys, kernel: Kernel, scale, out_acc, lse_acc, covered: list) -> list:
    """Run the parts ``part_rows`` (``(row_start, row_end, causal, fold, ready)``, keys ``part_keys[2i], part_keys[2i+1]``;
    ``split_parts`` makes both from ``Part`` objects) and
    merge each result into ``out_acc, lse_acc`` (in place; ``covered`` lists the row ranges already
    written, so a range's first result is stored without a merge). Returns each part's kernel aux."""
    auxes = []
    for i, (r0, r1, causal, fold, ready) in enumerate(part_rows):
        k, v = part_keys[2 * i], part_keys[2 * i + 1]
        _check_alignment(kernel, q, r1 - r0, k.shape[2], causal)
        if ready is not None:
            ready()
        o, lse, aux = kernel.forward(_fold(q[:, :, r0:r1], fold), _fold(k, fold), _fold(v, fold), causal, scale)
        auxes.append(aux)
        o, lse = _unfold(o, fold), _unfold(lse, fold)
        if all(r1 <= s or r0 >= e for s, e in covered):  # first result for these rows: no merge
            out_acc[:, :, r0:r1], lse_acc[:, :, r0:r1] = o, lse
        else:
            merge_into_(out_acc[:, :, r0:r1], lse_acc[:, :, r0:r1], o, lse)
        covered.append((r0, r1))
    return auxes


def backward_into(dout, dlse, q, out, lse, part_rows, part_keys, auxes, kernel: Kernel, scale, dq) -> list:
    """The backward of ``forward_into`` with the *merged* ``out, lse``: adds each part's query gradient
    into ``dq`` (in place) and returns the parts' key and value gradients ``[dk_0, dv_0, dk_1, ...]``."""
    kv_grads = []
    for i, (r0, r1, causal, fold, _) in enumerate(part_rows):
        k, v = part_keys[2 * i], part_keys[2 * i + 1]
        _check_alignment(kernel, q, r1 - r0, k.shape[2], causal)
        qp, kp, vp = _fold(q[:, :, r0:r1], fold), _fold(k, fold), _fold(v, fold)
        op, lp = _fold(out[:, :, r0:r1], fold), _fold(lse[:, :, r0:r1], fold)
        dqp, dkp, dvp = kernel.backward(_fold(dout[:, :, r0:r1], fold), qp, kp, vp, op, lp, auxes[i], causal, scale)
        if dlse is not None:
            # dS += P * dlse: a kernel backward with v = 0, out = e_0 and dout = -dlse * e_0 yields
            # exactly that term (its dP is 0 and its rowsum(dout * out) is -dlse).
            e0 = torch.zeros_like(op)
            e0[..., 0] = 1
            dout2 = torch.zeros_like(op)
            dout2[..., 0] = -_fold(dlse[:, :, r0:r1], fold).to(op.dtype)
            dq2, dk2, _ = kernel.backward(dout2, qp, kp, torch.zeros_like(vp), e0, lp, auxes[i], causal, scale)
            dqp, dkp = dqp + dq2, dkp + dk2
        dq[:, :, r0:r1] += _unfold(dqp, fold)
        kv_grads += [_unfold(dkp, fold), _unfold(dvp, fold)]
    return kv_grads


class _PartsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, part_rows, kernel: Kernel, scale, reducer, *part_keys):
        if reducer is None:
            out_acc, lse_acc = output_buffers(q, part_rows, fused_merge_available(q))
        else:  # the reducer merges across processes in the accumulation dtype
            out_acc = q.new_zeros(q.shape, dtype=accumulation_dtype(q.dtype))
            lse_acc = q.new_full(q.shape[:3], float("-inf"), dtype=out_acc.dtype)
        auxes = forward_into(q, part_rows, part_keys, kernel, scale, out_acc, lse_acc, [])
        if reducer is not None:
            out_acc, lse_acc = reducer.merge(out_acc, lse_acc)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, out, lse_acc, *part_keys)
        ctx.part_rows, ctx.kernel, ctx.scale, ctx.reducer, ctx.auxes = part_rows, kernel, scale, reducer, auxes
        ctx.set_materialize_grads(False)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, out, lse, *part_keys = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if ctx.reducer is not None:  # every rank's output depends on every rank's parts: sum their gradients
            dout, dlse = ctx.reducer.sum_output_grad(dout, dlse)
        dq = torch.zeros_like(q, dtype=accumulation_dtype(q.dtype))
        kv_grads = backward_into(dout, dlse, q, out, lse, ctx.part_rows, part_keys, ctx.auxes, ctx.kernel, ctx.scale, dq)
        return (dq.to(q.dtype), None, None, None, None, *kv_grads)


def parts_attention(
    q: torch.Tensor, parts: list[Part], kernel: Kernel, scale: float, reducer: Reducer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged attention of ``q: (B, H, S, D)`` over ``parts``; returns ``(out, lse)``.

    ``out`` has q's dtype and shape; ``lse: (B, H, S)`` is float32 (float64 for float64 input) and is
    ``-inf`` in rows that no part covers (such rows get ``out = 0``).
    """
    part_rows, part_keys = split_parts(parts)
    return _PartsAttention.apply(q, part_rows, kernel, scale, reducer, *part_keys)


def split_parts(parts: list[Part]) -> tuple[tuple, list[torch.Tensor]]:
    """``(part_rows, part_keys)`` for ``forward_into`` / ``backward_into``: each part's ``(row_start, row_end,
    causal, fold, ready)`` and its keys and values, flattened."""
    return (tuple((p.row_start, p.row_end, p.causal, p.fold, p.ready) for p in parts),
            [t for p in parts for t in (p.k, p.v)])
