"""Phase 1 across hosts: each host encodes its blocks behind the anchor, with no communication but
(in ``"broadcast"`` mode) the anchor's KV, sent once per layer from the owner of block 0."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import StarInputError
from ..layout import BlockLayout
from ..ops.backends import check_qkv
from ..ops.star import can_fuse_anchor, local_attention, phase1_parts
from .agreement import agree, validated
from .collectives import broadcast_anchor, tie
from .guard import guarded_step


def _check_inputs(q, k, v, layout: BlockLayout, group, recompute: bool) -> None:
    check_qkv(q, k, v)
    if dist.get_world_size(group) != layout.world_size or dist.get_rank(group) != layout.rank:
        raise StarInputError(
            f"the layout is for rank {layout.rank} of {layout.world_size}, but this process is rank "
            f"{dist.get_rank(group)} of {dist.get_world_size(group)} in the group; build it with "
            "BlockLayout.from_config(config, context_len, group size, group rank)"
        )
    rows = layout.num_tokens + layout.anchor_rows(recompute)
    if q.shape[2] != rows or k.shape[2] != rows:
        what = "the anchor's and its own" if layout.anchor_rows(recompute) else "its own"
        raise StarInputError(
            f"rank {layout.rank} must pass {rows} rows ({what} tokens), got q with {q.shape[2]} and k with "
            f"{k.shape[2]}"
        )


def _needs_broadcast(layout: BlockLayout) -> bool:
    return any(layout.for_rank(r).needs_anchor for r in range(layout.world_size))


def phase1_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    group: "dist.ProcessGroup",
    anchor_source: str = "broadcast",
    scale: float | None = None,
    backend: str = "auto",
    check: bool = True,
    timeout_s: float | None = None,
    keep_alive: list | None = None,
    anchor: "tuple[torch.Tensor, torch.Tensor] | None" = None,
    received: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's phase-1 attention on this host; returns ``(out, lse)`` for the rows given.

    Rows: this host's tokens (``layout.token_range``), preceded in ``"recompute"`` mode by the anchor's
    ``layout.anchor_rows(True)`` tokens on hosts that need the anchor; an idle host passes 0 rows.
    ``q: (B, H, rows, D)``, ``k, v: (B, Hkv, rows, D)``. Every rank of ``group`` must call this, idle
    ranks too. ``check=True`` first makes the ranks agree on settings and shapes (one small
    all-gather); the engine does that once per prefill and passes ``check=False`` per layer.

    Differentiable (``k, v`` requiring gradients on every rank, idle ranks' empty ones too): in
    ``"broadcast"`` mode the ranks whose blocks attend the anchor send its gradient back to the owner
    of block 0 (``collectives.broadcast_anchor``); in ``"recompute"`` mode each host's anchor rows carry
    their own gradient. Each rank's rows are its own, so their losses simply add up across ranks.
    The owner's and the users' backward of the broadcast must both run: by default the broadcast's
    result is tied into ``out`` (enough when every rank's loss uses ``out``); a model, whose last
    layer's output may reach no loss on some rank, passes ``keep_alive`` (a list) instead, collects
    the tensors and ties them into its loss (``collectives.tie``).

    Recomputation (activation checkpointing runs a layer's forward again in the backward pass): the
    first run passes ``received`` (a list), which gets the anchor's ``(k, v)`` this rank received, or
    ``None`` where it received none; the recomputation passes that back as ``anchor`` and runs with no
    collective at all (no check, no broadcast), so the ranks need not recompute in the same order. The
    first run's broadcast node keeps its backward.
    """
    recompute = anchor_source == "recompute"
    needs_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    recomputing = received is None and anchor is not None
    with guarded_step("phase1", group):
        if check and not recomputing:
            error = validated(_check_inputs, q, k, v, layout, group, recompute)
            if anchor_source not in ("broadcast", "recompute"):
                error = f"anchor_source must be 'broadcast' or 'recompute', got {anchor_source!r}"
            meta = {"layout": (layout.context_len, layout.block_size, layout.anchor_size, layout.world_size),
                    "anchor_source": anchor_source, "dtype": str(q.dtype), "batch": q.shape[0],
                    "heads": tuple(q.shape[1:2]) + tuple(k.shape[1:2]), "head_dim": q.shape[-1], "scale": scale,
                    "kv_requires_grad": needs_grad}
            agree(group, "phase1", meta, error)
        anchor_k = anchor_v = ready = None
        if recomputing:
            anchor_k, anchor_v = anchor
        elif not recompute and layout.world_size > 1 and _needs_broadcast(layout):
            b, hkv, _, d = k.shape
            a = layout.anchor_len
            src_k, src_v = (k[:, :, :a], v[:, :, :a]) if layout.owns_anchor else (None, None)
            where = dict(src=layout.anchor_owner, shape=(b, hkv, a, d), dtype=k.dtype, device=k.device, group=group,
                         timeout_s=timeout_s)
            if needs_grad:  # the users' anchor gradients come back to the owner, point to point
                users = tuple(r for r in range(layout.world_size) if layout.for_rank(r).needs_anchor)
                link = torch.cat([k[:, :, :0], v[:, :, :0]], dim=2) if layout.needs_anchor else None
                anchor_k, anchor_v = broadcast_anchor(src_k, src_v, users=users, link=link, **where)
            else:  # inference: the blocks' own parts run while the anchor is in flight
                anchor_k, anchor_v, ready = broadcast_anchor(src_k, src_v, background=True, **where)
        parts = phase1_parts(
            k, v, layout.block_lengths, has_block0=layout.owns_anchor, anchor_len=layout.anchor_len,
            anchor_k=None if layout.owns_anchor else anchor_k, anchor_v=None if layout.owns_anchor else anchor_v,
            anchor_rows=layout.anchor_rows(recompute), anchor_ready=None if layout.owns_anchor else ready,
            fuse_anchor=can_fuse_anchor(q, k, v, backend),
        )
        out, lse = local_attention(q, parts, scale=scale, backend=backend)
        if ready is not None:
            ready()  # the owner's send and an idle rank's receive end here
        if received is not None:
            received.append((anchor_k, anchor_v))
        if anchor_k is not None and needs_grad and not recomputing:
            if keep_alive is not None:
                keep_alive += [anchor_k, anchor_v]
            else:
                out = tie(out, anchor_k, anchor_v)
        return out, lse
