"""The collectives of Star Attention: the phase-2 merge across hosts and the phase-1 anchor broadcast.

Every function takes its process group explicitly; nothing here uses the default world group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._compat import global_rank
from ..errors import StarCollectiveError
from ..ops.merge import accumulation_dtype, merge_partials
from .guard import wait


class AllReduceMerge:
    """The LSE merge across the ranks of ``group`` (``ops/merge.py`` gives the formula), in float32
    (float64 for float64 input), with one max all-reduce and one sum all-reduce::

        m = max_h s_h                                  all-reduce MAX of lse      (B, H, S)
        [num | den] = sum_h exp(s_h - m) * [O_h | 1]   all-reduce SUM, packed     (B, H, S, D + 1)
        O = num / den,  s = m + log(den)

    A rank without keys has ``s_h = -inf`` and contributes zeros. As a ``Reducer`` for
    ``ops.parts_attention`` it also sums the query gradient over the ranks in the backward pass (the
    query is replicated, each rank holds part of its keys).
    """

    def __init__(self, group: "dist.ProcessGroup", timeout_s: float | None = None):
        self.group = group
        self.timeout_s = timeout_s

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        wait(dist.all_reduce(tensor, op=op, group=self.group, async_op=True), self.timeout_s, tensor)
        return tensor

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called in a forward pass that keeps no graph (``ops.parts_attention``), so it works in place."""
        acc = accumulation_dtype(out.dtype)
        m = self._all_reduce(lse.to(acc, copy=True), dist.ReduceOp.MAX).nan_to_num_(neginf=0.0)  # keyless rows: 0
        packed = out.new_empty((*out.shape[:-1], out.shape[-1] + 1), dtype=acc)
        w = torch.exp(lse - m, out=packed[..., -1]).unsqueeze(-1)
        torch.mul(out, w, out=packed[..., :-1])
        self._all_reduce(packed, dist.ReduceOp.SUM)
        num, den = packed[..., :-1], packed[..., -1]
        # den >= 1 in a row with keys (its largest term is exp(0)); 0 in a keyless row, which gets O = 0
        # and s = 0 + log 0 = -inf
        return num / den.clamp_min(1.0).unsqueeze(-1), m + torch.log(den)

    def sum_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(grad.contiguous(), dist.ReduceOp.SUM)


class AllGatherMerge(AllReduceMerge):
    """The paper's reference form of the phase-2 merge: every rank gathers every rank's ``(out, lse)``
    (``N`` times the data of the all-reduce form) and merges them locally with ``merge_partials``.
    Kept to measure against; same result within rounding."""

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(out.dtype)
        packed = torch.cat([out.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1).contiguous()
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(self.group))]
        wait(dist.all_gather(gathered, packed, group=self.group, async_op=True), self.timeout_s, packed)
        return merge_partials([(g[..., :-1], g[..., -1]) for g in gathered])


class _BroadcastAnchor(torch.autograd.Function):
    """Forward: rank ``src`` sends ``kv`` to every rank. Backward: the ranks' gradients are summed
    onto ``src`` (the anchor's KV is used on every host, but computed on ``src`` alone)."""

    @staticmethod
    def forward(ctx, kv, src, group, timeout_s):
        kv = kv.contiguous().clone()
        wait(dist.broadcast(kv, src=global_rank(group, src), group=group, async_op=True), timeout_s, kv)
        ctx.src, ctx.group, ctx.timeout_s = src, group, timeout_s
        return kv

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dst = global_rank(ctx.group, ctx.src)
        wait(dist.reduce(grad, dst=dst, op=dist.ReduceOp.SUM, group=ctx.group, async_op=True), ctx.timeout_s, grad)
        is_src = dist.get_rank(ctx.group) == ctx.src
        return (grad if is_src else torch.zeros_like(grad)), None, None, None


def broadcast_anchor(
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    *,
    src: int,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    group: "dist.ProcessGroup",
    timeout_s: float | None = None,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send the anchor's ``k, v: (B, Hkv, a, D)`` from group rank ``src`` to every rank of ``group``.

    On ``src`` pass the tensors; elsewhere pass None and the expected ``shape``, ``dtype``, ``device``.
    K and V travel as one packed tensor ``(2, B, Hkv, a, D)``, in one broadcast. Differentiable: with
    ``requires_grad`` (which must be the same on every rank) the backward pass sums the ranks' anchor
    gradients onto ``src``.
    """
    kv = _packed_anchor(k, v, src, shape, dtype, device, group)
    if dist.get_rank(group) != src:  # a placeholder that asks for a gradient where the owner's KV does,
        kv.requires_grad_(requires_grad)  # so every rank reduces
    kv = _BroadcastAnchor.apply(kv, src, group, timeout_s)
    return kv[0], kv[1]


def _packed_anchor(k, v, src, shape, dtype, device, group) -> torch.Tensor:
    """The anchor's K and V as one ``(2, B, Hkv, a, D)`` tensor: on ``src`` its KV, elsewhere a buffer."""
    if dist.get_rank(group) == src:
        return torch.stack([k, v])
    return torch.empty((2, *shape), dtype=dtype, device=device)


def post_anchor_broadcast(
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    *,
    src: int,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    group: "dist.ProcessGroup",
    timeout_s: float | None = None,
):
    """``broadcast_anchor`` without gradients and without waiting: returns ``(k, v, ready)`` where
    ``k, v`` fill in the background and ``ready()`` (idempotent) waits for them. Attention that does
    not need the anchor can run in between (``ops.Part.ready``), overlapping the transfer."""
    kv = _packed_anchor(k, v, src, shape, dtype, device, group)
    work = dist.broadcast(kv, src=global_rank(group, src), group=group, async_op=True)
    pending = [work]

    def ready() -> None:
        if pending:
            wait(pending.pop(), timeout_s, kv)
    return kv[0], kv[1], ready


class _Tie(torch.autograd.Function):
    """Returns ``out`` unchanged but makes the backward pass visit ``others`` (with zero gradient),
    so that a collective inside their backward runs on every rank, also where they are unused."""

    @staticmethod
    def forward(ctx, out, *others):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in others]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad, *unused):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes])


def tie(out: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in others):
        return out
    return _Tie.apply(out, *others)


def broadcast_tokens(tokens: torch.Tensor | None, done: torch.Tensor | None, *, src: int,
                     group: "dist.ProcessGroup", device: torch.device, batch: int, timeout_s: float | None = None,
                     error: BaseException | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Send the chosen token ids ``(B,)`` and the sequences' stop flags ``(B,)`` from group rank ``src``
    to every rank, in one broadcast; returns both on CPU. Other ranks pass ``None`` for both.

    ``error``: ``src`` failed while choosing the tokens (sampling, a stop-string check). It still takes
    part in the broadcast, flagging the failure, and then sends the message, so every rank raises the same
    ``StarCollectiveError`` at once instead of waiting out the collective's timeout."""
    from .guard import guarded_step

    me = dist.get_rank(group)
    with guarded_step("decode", group):
        buf = torch.zeros(3, batch, dtype=torch.long, device=device)
        if me == src:
            if error is None:
                buf[0].copy_(tokens.long())
                buf[1].copy_(done.long())
            else:
                buf[2].fill_(1)
        wait(dist.broadcast(buf, src=global_rank(group, src), group=group, async_op=True), timeout_s, buf)
        buf = buf.cpu()
        failed = bool(buf[2, 0])
        if failed:
            message = [f"{type(error).__name__}: {error}".splitlines()[0][:500] if me == src else None]
            dist.broadcast_object_list(message, src=global_rank(group, src), group=group)
    if failed:
        exc = StarCollectiveError(f"rank {src} (the query host) failed while choosing the next tokens: {message[0]}",
                                  step="decode", failed_rank=src)
        exc.on_every_rank = True
        raise exc from error
    return buf[0], buf[1].bool()
