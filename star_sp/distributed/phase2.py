"""Phase 2 across hosts: the query attends every host's KV; results merge by all-reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import StarInputError
from ..ops.backends import check_qkv
from ..ops.star import local_attention, phase2_parts
from .agreement import agree, validated
from .collectives import AllGatherMerge, AllReduceMerge
from .guard import guarded_step

MERGES = {"allreduce": AllReduceMerge, "allgather": AllGatherMerge}


def _merge(merge: str):
    """The merge class named ``merge``, or one line naming the choices."""
    if merge not in MERGES:
        raise StarInputError(f"merge must be one of {tuple(MERGES)}, got {merge!r}")
    return MERGES[merge]


def _check_inputs(q, ctx_k, ctx_v, query_k, query_v, group, merge) -> None:
    _merge(merge)
    if q.dim() == 4 and q.shape[2] == 0:
        raise StarInputError("the query is empty: pass at least one query token")
    check_qkv(q, ctx_k, ctx_v)
    is_query_host = dist.get_rank(group) == dist.get_world_size(group) - 1
    if is_query_host and query_k is None:
        raise StarInputError("the query host (the last rank) must pass query_k and query_v: the KV of the "
                             "query and generated tokens, ending with the current query rows")
    if not is_query_host and query_k is not None:
        raise StarInputError("only the query host (the last rank) holds query KV; pass query_k=None here")
    if query_k is not None:
        check_qkv(q, query_k, query_v)
        if query_k.shape[2] < q.shape[2]:
            raise StarInputError(f"query_k holds {query_k.shape[2]} tokens, fewer than the {q.shape[2]} query "
                                 "rows; it must end with the current query rows' own KV")


def phase2_attention(
    q: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    *,
    group: "dist.ProcessGroup",
    query_k: torch.Tensor | None = None,
    query_v: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    check: bool = True,
    timeout_s: float | None = None,
    merge: str = "allreduce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's phase-2 attention; returns the merged ``(out, lse)``, the same on every rank.

    ``q: (B, H, Lq, D)`` is the same on every rank. ``ctx_k, ctx_v: (B, Hkv, Lctx_h, D)`` are this
    host's context KV (``Lctx_h = 0`` on an idle host), attended with no mask. The query host (last
    rank) also passes ``query_k, query_v: (B, Hkv, Lk, D)``, ``Lk >= Lq``, the KV of the query and
    generated tokens ending with the current rows, attended causally (bottom-right)::

        context keys (any host)        query keys (query host)
        x x x x x x x x                x x x .        row Lq-2
        x x x x x x x x                x x x x        row Lq-1

    ``merge="allgather"`` uses the paper's reference form (gather every rank's output and LSE, merge
    locally) instead of one max and one sum all-reduce. Gradients: the output's gradient is summed over
    the ranks and each rank's query gradient is its own keys' share, so parameter gradients summed
    over the ranks are exact when the ranks' losses add up to the loss (a loss of the replicated output
    counted on one rank, or ``1/N`` on each; ``collectives.AllReduceMerge.sum_output_grad``).
    """
    with guarded_step("phase2", group):
        if check:  # the merge too: a bad one on one rank is the same error on every rank
            error = validated(_check_inputs, q, ctx_k, ctx_v, query_k, query_v, group, merge)
            meta = {"merge": merge, "dtype": str(q.dtype), "q_shape": tuple(q.shape), "kv_heads": ctx_k.shape[1] if ctx_k.dim() == 4 else None,
                    "scale": scale, "q_requires_grad": torch.is_grad_enabled() and q.requires_grad}
            agree(group, "phase2", meta, error)
        parts = phase2_parts((0, q.shape[2]), ctx_k, ctx_v, query_k, query_v)
        return local_attention(q, parts, scale=scale, backend=backend, reducer=_merge(merge)(group, timeout_s))
