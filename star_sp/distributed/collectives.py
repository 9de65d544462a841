"""The collectives of Star Attention: the phase-2 merge across hosts and the phase-1 anchor broadcast.

Every function takes its process group explicitly; nothing here uses the default world group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._compat import global_rank
from ..errors import StarCollectiveError
from ..ops.merge import accumulation_dtype, merge_finish, merge_partials, merge_shift
from .guard import wait


class AllReduceMerge:
    """The LSE merge across the ranks of ``group`` (``ops/merge.py`` gives the formula), in float32
    (float64 for float64 input), with one max all-reduce and one sum all-reduce::

        m = max_h s_h                                  all-reduce MAX of lse      (B, H, S)
        [num | den] = sum_h exp(s_h - m) * [O_h | 1]   all-reduce SUM, packed     (B, H, S, D + 1)
        O = num / den,  s = m + log(den)

    A rank without keys has ``s_h = -inf`` and contributes zeros. As a ``Reducer`` for
    ``ops.parts_attention`` it also sums the merged result's gradient over the ranks in the backward
    pass (``sum_output_grad``).
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
        m = merge_shift(self._all_reduce(lse.to(acc, copy=True), dist.ReduceOp.MAX))
        packed = out.new_empty((*out.shape[:-1], out.shape[-1] + 1), dtype=acc)
        w = torch.exp(lse - m, out=packed[..., -1]).unsqueeze(-1)
        torch.mul(out, w, out=packed[..., :-1])
        self._all_reduce(packed, dist.ReduceOp.SUM)
        return merge_finish(packed[..., :-1], packed[..., -1], m)

    def sum_output_grad(self, dout: torch.Tensor, dlse: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backward rule: sum the merged ``(out, lse)``'s gradients over the ranks, in float32 (one
        packed all-reduce). The merged result on every rank depends on every rank's partial result, so
        a rank's partial gets the sum of all ranks' gradients; each rank's query gradient is then the share
        of its own keys (not summed). Hence parameter gradients summed over the ranks are exact when the
        ranks' losses add up to the loss: a loss computed from the replicated output counts on one
        rank (``star_sp.training`` counts it on the query host, weight 0 elsewhere) or ``1/N`` on each.
        Every rank must still run this backward (it is a collective)."""
        from .guard import guarded_step

        acc = accumulation_dtype(dout.dtype)
        with guarded_step("phase2 backward", self.group):
            packed = torch.empty((*dout.shape[:-1], dout.shape[-1] + 1), dtype=acc, device=dout.device)
            packed[..., :-1] = dout
            if dlse is None:
                packed[..., -1] = 0
            else:
                packed[..., -1] = dlse
            self._all_reduce(packed, dist.ReduceOp.SUM)
            dlse = packed[..., -1]
            # a gradient on the merged log-sum-exp costs a kernel backward per part: skip it where no rank
            # has one (the summed value is the same on every rank, so every rank decides alike)
            dlse = dlse if bool(dlse.ne(0).any()) else None
        return packed[..., :-1].to(dout.dtype), dlse


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
    """Forward: rank ``src`` sends the anchor's packed KV to every rank (one broadcast). Backward: each
    rank in ``users`` (the ranks whose blocks attend the anchor, ``src`` excluded) sends its gradient of
    the anchor's KV to ``src`` (point to point, float32); ``src`` adds them up in float32.

    Ranks that do not use the anchor (idle ranks) take part in the forward broadcast only, without
    gradients, so a backward pass never has to reach them. On a user, the input is ``link``, an empty
    tensor computed from the rank's own K and V: it gives this node the same path to the parameters as
    the owner's anchor KV has (and needs a gradient exactly when the owner's does, also when only the
    V projection trains), so ``torch.autograd.grad(loss, params)`` runs it wherever it runs the
    owner's (a leaf placeholder would be pruned there and leave the owner waiting)."""

    @staticmethod
    def forward(ctx, kv_or_link, src, users, shape, group, timeout_s):
        me = dist.get_rank(group)
        kv = kv_or_link.contiguous().clone() if me == src else kv_or_link.new_empty(shape)
        wait(dist.broadcast(kv, src=global_rank(group, src), group=group, async_op=True), timeout_s, kv)
        ctx.src, ctx.users, ctx.group, ctx.timeout_s = src, users, group, timeout_s
        ctx.link_shape = kv_or_link.shape
        return kv

    @staticmethod
    def backward(ctx, grad):
        from .guard import guarded_step

        group, src = ctx.group, ctx.src
        with guarded_step("phase1 backward", group):
            if dist.get_rank(group) != src:
                send = grad.to(accumulation_dtype(grad.dtype)).contiguous()
                wait(dist.isend(send, dst=global_rank(group, src), group=group), ctx.timeout_s, send)
                return grad.new_zeros(ctx.link_shape), None, None, None, None, None
            total = grad.to(accumulation_dtype(grad.dtype), copy=True)
            for rank in ctx.users:
                part = torch.empty_like(total)
                wait(dist.irecv(part, src=global_rank(group, rank), group=group), ctx.timeout_s, part)
                total += part
            return total.to(grad.dtype), None, None, None, None, None


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
    users: tuple[int, ...] = (),
    link: torch.Tensor | None = None,
    background: bool = False,
):
    """Send the anchor's ``k, v: (B, Hkv, a, D)`` from group rank ``src`` to every rank of ``group``;
    returns ``(k, v)``.

    On ``src`` pass the tensors; elsewhere pass None and the expected ``shape``, ``dtype``, ``device``.
    K and V travel as one packed tensor ``(2, B, Hkv, a, D)``, in one broadcast.

    Differentiable when ``users`` (the group ranks other than ``src`` whose blocks attend the anchor,
    the same tuple on every rank) is given: on ``src`` when its KV requires a gradient, and on each
    user, which passes ``link`` (its own KV, sliced to nothing, see ``_BroadcastAnchor``). The backward
    pass brings the users' anchor gradients to ``src``, summed in float32. Other ranks get no gradient.

    ``background=True`` (no gradients): returns ``(k, v, ready)`` without waiting, ``k, v`` filling in
    the background until ``ready()`` (idempotent) waits for them; attention that does not need the anchor
    can run in between (``ops.Part.ready``), overlapping the transfer.
    """
    me = dist.get_rank(group)
    differentiable = torch.is_grad_enabled() and (
        (me == src and (k.requires_grad or v.requires_grad)) or (me in users and link is not None and link.requires_grad))
    if background or not differentiable:
        kv = _packed_anchor(k, v, src, shape, dtype, device, group)
        pending = [dist.broadcast(kv, src=global_rank(group, src), group=group, async_op=True)]

        def ready() -> None:
            if pending:
                wait(pending.pop(), timeout_s, kv)
        if background:
            return kv[0], kv[1], ready
        ready()
        return kv[0], kv[1]
    packed = torch.stack([k, v]) if me == src else link
    kv = _BroadcastAnchor.apply(packed, src, tuple(users), (2, *shape), group, timeout_s)
    return kv[0], kv[1]


def _packed_anchor(k, v, src, shape, dtype, device, group) -> torch.Tensor:
    """The anchor's K and V as one ``(2, B, Hkv, a, D)`` tensor: on ``src`` its KV, elsewhere a buffer."""
    if dist.get_rank(group) == src:
        return torch.stack([k, v])
    return torch.empty((2, *shape), dtype=dtype, device=device)


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
            dist.broadcast_object_list(message, src=global_rank(group, src), group=group,
                                       device=device if device.type == "cuda" else None)
    if failed:
        exc = StarCollectiveError(f"rank {src} (the query host) failed while choosing the next tokens: {message[0]}",
                                  step="decode", failed_rank=src)
        exc.on_every_rank = True
        raise exc from error
    return buf[0], buf[1].bool()
