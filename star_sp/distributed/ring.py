"""Exact ring attention across hosts: the baseline Star Attention is measured against.

Every host holds its zigzag share of the sequence (``RingLayout``: chunks ``r`` and ``2N-1-r``) and
attends causally to the *whole* sequence: the hosts' KV travels around the ring (host ``r`` sends to
``r+1`` and receives from ``r-1``), one hop per step, each step's send overlapped with that step's
attention, and the partial results merge with the same LSE merge as Star's (``ops/merge.py``). The
zigzag split gives every host the same causal work. Exact: the result equals causal attention over
the whole sequence (the tests compare it with the float64 oracle).

Backward (ring-attention style): the KV goes around the ring again, each host adds its query
gradient locally, and the key/value gradients travel with the KV and arrive back at their owner
after ``N`` hops; the kernels' backward uses the merged output and log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import StarInputError
from ..layout import RingLayout
from ..ops.attention import default_scale
from ..ops.backends import check_qkv, select_kernel
from ..ops.merge import accumulation_dtype
from ..ops.parts import backward_into, forward_into, split_parts
from ..ops.ring import ring_parts
from .agreement import agree, validated
from .guard import guarded_step, wait


def _exchange(send: torch.Tensor, recv: torch.Tensor, group, timeout_s):
    """Post: send ``send`` to the next rank, receive ``recv`` from the previous. Returns a waiter."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    ops = [dist.P2POp(dist.isend, send.contiguous(), dist.get_global_rank(group, (r + 1) % n), group),
           dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (r - 1) % n), group)]
    works = dist.batch_isend_irecv(ops)

    def done() -> torch.Tensor:
        for work in works:
            wait(work, timeout_s, recv)
        return recv
    return done


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: RingLayout, kernel, scale, group, timeout_s):
        n, r = layout.world_size, layout.rank
        b, h, s, d = q.shape
        acc = accumulation_dtype(q.dtype)
        out_acc = torch.zeros_like(q, dtype=acc)  # q's memory layout: the model's transpose back is free
        lse_acc = q.new_full((b, h, s), float("-inf"), dtype=acc)
        covered: list = []
        auxes = []
        kv = torch.stack([k, v])
        for t in range(n):
            src = (r - t) % n
            pending = None
            if t < n - 1:
                nxt = (r - t - 1) % n
                pending = _exchange(kv, kv.new_empty((2, *k.shape[:2], layout.num_tokens_of(nxt), d)), group, timeout_s)
            parts, _ = ring_parts(layout, src, kv[0], kv[1])
            part_rows, part_keys = split_parts(parts)
            auxes.append(forward_into(q, part_rows, part_keys, kernel, scale, out_acc, lse_acc, covered))
            if pending is not None:
                kv = pending()
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.layout, ctx.kernel, ctx.scale, ctx.group, ctx.timeout_s, ctx.auxes = layout, kernel, scale, group, timeout_s, auxes
        ctx.set_materialize_grads(False)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, group, timeout_s = ctx.layout, ctx.group, ctx.timeout_s
        n, r = layout.world_size, layout.rank
        if dout is None:
            dout = torch.zeros_like(out)
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # gradients of the KV in hand, travelling with it
        for t in range(n):
            src = (r - t) % n
            nxt = (r - t - 1) % n
            shape = (2, *k.shape[:2], layout.num_tokens_of(nxt), k.shape[-1])
            pending = _exchange(kv, kv.new_empty(shape), group, timeout_s) if t < n - 1 else None
            parts, offsets = ring_parts(layout, src, kv[0], kv[1])
            part_rows, part_keys = split_parts(parts)
            grads = backward_into(dout, dlse, q, out, lse, part_rows, part_keys, ctx.auxes[t], ctx.kernel, ctx.scale, dq)
            for i, start in enumerate(offsets):
                dk, dv = grads[2 * i], grads[2 * i + 1]
                dkv[0, :, :, start:start + dk.shape[2]] += dk
                dkv[1, :, :, start:start + dv.shape[2]] += dv
            if n > 1:  # after N hops each host holds the gradient of its own KV
                dkv = _exchange(dkv, torch.empty(shape, dtype=acc, device=dkv.device), group, timeout_s)()
            if pending is not None:
                kv = pending()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def _check_inputs(q, k, v, layout: RingLayout, group) -> None:
    check_qkv(q, k, v)
    if dist.get_world_size(group) != layout.world_size or dist.get_rank(group) != layout.rank:
        raise StarInputError(f"the layout is for rank {layout.rank} of {layout.world_size}, but this process is "
                             f"rank {dist.get_rank(group)} of {dist.get_world_size(group)} in the group")
    if q.shape[2] != layout.num_tokens or k.shape[2] != layout.num_tokens:
        raise StarInputError(f"rank {layout.rank} must pass its {layout.num_tokens} rows (RingLayout.shard), got "
                             f"q with {q.shape[2]} and k with {k.shape[2]}")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: RingLayout,
    *,
    group: "dist.ProcessGroup",
    scale: float | None = None,
    backend: str = "auto",
    check: bool = True,
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the whole sequence for this host's rows; returns ``(out, lse)``.

    ``q: (B, H, rows, D)``, ``k, v: (B, Hkv, rows, D)``: this host's rows in ``layout`` order
    (``layout.shard(x, dim=2)``: chunk ``r`` then chunk ``2N-1-r``), with positions
    ``layout.positions()``. Every rank of ``group`` must call it. Differentiable in ``q, k, v``
    through ``out`` and ``lse``. ``check=True`` first makes the ranks agree on shapes and settings.
    """
    with guarded_step("ring", group):
        if check:
            error = validated(_check_inputs, q, k, v, layout, group)
            meta = {"context_len": layout.context_len, "dtype": str(q.dtype), "batch": q.shape[0],
                    "heads": (q.shape[1], k.shape[1]), "head_dim": q.shape[-1], "scale": scale}
            agree(group, "ring", meta, error)
        kernel = select_kernel(backend, q, k)
        scale = default_scale(q.shape[-1]) if scale is None else scale
        return _Ring.apply(q, k, v, layout, kernel, scale, group, timeout_s)
