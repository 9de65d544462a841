"""Star Attention for one host, as pure tensor math (no collectives).

Phase 1 (context encoding). A host holds the concatenation of its blocks, optionally preceded by the
anchor's own rows (the paper's "recompute" form). Rows of block 0 attend earlier rows of block 0; rows
of any other block attend the anchor's keys (unmasked) and earlier rows of their own block::

    rows \\ keys     anchor   own block
    B_0               -       causal          (block 0 is the anchor's source)
    B_i, i > 0      all       causal

Phase 2 (query). Query rows attend this host's context keys unmasked (context precedes every query
token) and, on the query host, the query and generated tokens' keys with the causal mask aligned
bottom-right. Hosts merge their results with the LSE merge (``star_sp.distributed``).

All tensors are ``(B, H, S, D)``; KV may have fewer heads (GQA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import check_block_anchor
from ..errors import StarInputError
from .attention import default_scale, key_parts
from .backends import check_qkv, select_kernel
from .merge import accumulation_dtype, merge_into_
from .parts import Part, Reducer, parts_attention
from .valid_keys import own_keys, valid_keys_attention


def phase1_parts(
    k: torch.Tensor,
    v: torch.Tensor,
    block_lengths: Sequence[int],
    *,
    has_block0: bool,
    anchor_len: int,
    anchor_k: torch.Tensor | None = None,
    anchor_v: torch.Tensor | None = None,
    anchor_rows: int = 0,
    anchor_ready=None,
    fuse_anchor: bool = False,
) -> list[Part]:
    """Parts for one host's phase-1 rows: ``[anchor rows (anchor_rows of them) ; blocks]``.

    The anchor KV is, in this order of precedence: the host's own anchor rows (``anchor_rows > 0``),
    the first ``anchor_len`` keys of block 0 (``has_block0``), or ``anchor_k, anchor_v`` as given
    (received from the owner of block 0; ``anchor_ready`` waits for them to arrive). Equal-sized
    consecutive blocks share one folded kernel call. The blocks' own causal parts come before the
    part over the anchor, so that their kernels run while a received anchor is still in flight.

    ``fuse_anchor=True`` (only for kernels whose ``bottom_right_causal`` is true) gives each block
    after block 0 one causal call over ``[anchor ; block]`` keys instead (a copy of the anchor's KV
    per block; no second call and no merge), waiting for a received anchor first.
    """
    parts: list[Part] = []
    if anchor_rows:
        anchor_k, anchor_v = k[:, :, :anchor_rows], v[:, :, :anchor_rows]
        parts.append(Part(0, anchor_rows, anchor_k, anchor_v, causal=True))
    row = anchor_rows
    lengths = list(block_lengths)
    if has_block0 and lengths:
        anchor_k, anchor_v = k[:, :, row:row + anchor_len], v[:, :, row:row + anchor_len]
        parts.append(Part(row, row + lengths[0], k[:, :, row:row + lengths[0]], v[:, :, row:row + lengths[0]], True))
        row += lengths.pop(0)
    if not lengths:
        return parts
    if anchor_len and (anchor_k is None or anchor_v is None):
        raise ValueError("blocks after block 0 need the anchor's KV: pass anchor_k and anchor_v")
    if fuse_anchor and anchor_len:
        if anchor_ready is not None:
            anchor_ready()
        return parts + _fused_parts(k, v, row, lengths, anchor_k, anchor_v)
    start, end = row, row + sum(lengths)
    for n, count in _runs(lengths):  # runs of equal-length blocks, each run one folded causal call
        stop = row + n * count
        parts.append(Part(row, stop, k[:, :, row:stop], v[:, :, row:stop], causal=True, fold=count))
        row = stop
    if anchor_len:  # anchor_len 0: no anchor, every block alone (an ablation)
        parts.append(Part(start, end, anchor_k, anchor_v, ready=anchor_ready))
    return parts


def _runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(length, count)`` of each run of equal consecutive lengths."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _fused_parts(k, v, row: int, lengths: Sequence[int], anchor_k, anchor_v) -> list[Part]:
    """Blocks from ``row`` on, each attending ``[anchor ; itself]`` causally (bottom-right): per run of
    equal blocks one folded part whose keys hold ``[anchor ; block_j]`` for each block ``j`` in turn."""
    parts = []
    b, hkv, a, d = anchor_k.shape
    for n, count in _runs(lengths):
        stop = row + n * count
        fused = []
        for x, anchor in ((k, anchor_k), (v, anchor_v)):
            blocks = x[:, :, row:stop].reshape(b, hkv, count, n, d)
            anchors = anchor.unsqueeze(2).expand(b, hkv, count, a, d)
            fused.append(torch.cat([anchors, blocks], dim=3).reshape(b, hkv, count * (a + n), d))
        parts.append(Part(row, stop, fused[0], fused[1], causal=True, fold=count))
        row = stop
    return parts


def phase2_parts(
    rows: tuple[int, int],
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    query_k: torch.Tensor | None = None,
    query_v: torch.Tensor | None = None,
) -> list[Part]:
    """Parts for query rows ``[rows[0], rows[1])``: the local context keys, unmasked, then (on the query
    host) the query/generated keys, causal and aligned bottom-right. An empty context gives no part."""
    parts = key_parts(*rows, ctx_k, ctx_v, causal=False)
    if query_k is not None:
        parts += key_parts(*rows, query_k, query_v, causal=True)
    return parts


def phase2_local(
    q: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    query_k: torch.Tensor,
    query_v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2 with every block in this process: ``q: (B, H, Lq, D)`` attends the whole context's
    ``ctx_k, ctx_v: (B, Hkv, Lc, D)`` unmasked and ``query_k, query_v: (B, Hkv, Lk >= Lq, D)`` causally
    (bottom-right). Equals ``star_sp.distributed.phase2_attention`` over any number of hosts."""
    check_qkv(q, ctx_k, ctx_v)
    check_qkv(q, query_k, query_v)
    return local_attention(q, phase2_parts((0, q.shape[2]), ctx_k, ctx_v, query_k, query_v),
                           scale=scale, backend=backend)


def shared_context_attention(
    q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q questions over one context: ``q: (Q, H, L, D)`` attends ``ctx_k, ctx_v: (1, Hkv, Lc, D)``
    unmasked. The questions AND the query heads that share a KV head fold into the rows of one kernel
    call, ``(1, Hkv, (H / Hkv) * Q * L, D)`` over the context's ``Hkv`` heads, so each KV head is read
    once for all of them (a kernel handed ``(1, H, Q * L, D)`` would read each KV head once per query
    head: ``H / Hkv`` times the context's KV per call, which dominated a decode step at Q = 32 on an
    H200). Returns ``(out (Q, H, L, D), lse (Q, H, L))``; an empty context gives ``out = 0, lse = -inf``.
    No autograd wanted."""
    n, h, rows, d = q.shape
    if ctx_k.shape[2] == 0:
        return torch.zeros_like(q), q.new_full((n, h, rows), float("-inf"), dtype=accumulation_dtype(q.dtype))
    hkv = ctx_k.shape[1]
    if h % hkv:
        raise StarInputError(f"{h} query heads cannot share {hkv} KV heads: the query heads must be a multiple")
    groups = h // hkv  # head h reads KV head h // groups
    folded = q.reshape(n, hkv, groups, rows, d).permute(1, 2, 0, 3, 4).reshape(1, hkv, groups * n * rows, d)
    out, lse = local_attention(folded, key_parts(0, groups * n * rows, ctx_k, ctx_v, causal=False), scale=scale,
                               backend=backend)
    out = out.reshape(hkv, groups, n, rows, d).permute(2, 0, 1, 3, 4).reshape(n, h, rows, d)
    return out, lse.reshape(hkv, groups, n, rows).permute(2, 0, 1, 3).reshape(n, h, rows)


def per_sequence_context_attention(
    q: torch.Tensor, contexts: Sequence[tuple[torch.Tensor, torch.Tensor]], *, scale: float | None = None,
    backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several contexts of different lengths, one per sequence: row ``i`` of ``q: (S, H, L, D)`` attends
    its own context's ``(k_i, v_i): (1, Hkv, Lc_i, D)`` unmasked, one kernel call each (no padding;
    ``shared_context_attention``'s head folding, so each KV head is read once).
    Returns ``(out, lse)`` in the accumulation dtype; a sequence with an empty context gets ``out = 0,
    lse = -inf``."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for i, (k, v) in enumerate(contexts):  # one sequence's rows, its query heads folded onto its KV heads
        out[i:i + 1], lse[i:i + 1] = shared_context_attention(q[i:i + 1], k, v, scale=scale, backend=backend)
    return out, lse


def merge_own_keys_(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, query_k: torch.Tensor,
                    query_v: torch.Tensor, *, starts: torch.Tensor | None = None, scale: float | None = None,
                    backend: str = "auto") -> None:
    """Merge, in place into ``(out, lse)`` (accumulation dtype), each sequence's attention to its own
    query/generated keys ``(S, Hkv, Lk >= L, D)``, causal (bottom-right), its first ``starts[i]`` keys
    being padding when ``starts`` is given (the plain masked form: a few dozen keys per sequence)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if starts is None:
        own, own_lse = local_attention(q, key_parts(0, q.shape[2], query_k, query_v, causal=True), scale=scale,
                                       backend=backend)
    else:
        own, own_lse = valid_keys_attention(q, query_k, query_v, own_keys(starts, q.shape[2], query_k.shape[2]),
                                            scale)
    merge_into_(out, lse, own, own_lse)


def star_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    context_len: int,
    block_size: int,
    anchor_size: int,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Star Attention layer over ``[context ; query]`` held in one process, as one autograd call.

    ``q: (B, H, Lc + Lq, D)``, ``k, v: (B, Hkv, Lc + Lq, D)``; returns ``(out, lse)`` for every row,
    equal to dense attention under ``M_star``. This is phase 1 as a block-sparse prefill plus phase 2
    with every block local; it is also the form used to fine-tune under the anchor pattern on one device.
    """
    check_qkv(q, k, v)
    total = q.shape[2]
    if isinstance(context_len, bool) or not isinstance(context_len, int) or not 0 < context_len <= total:
        raise StarInputError(f"context_len must be an integer in [1, {total}] (the tokens of q), got {context_len!r}")
    check_block_anchor(block_size, anchor_size)
    kernel = select_kernel(backend, q, k)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    lengths = [min(block_size, context_len - s) for s in range(0, context_len, block_size)]
    parts = phase1_parts(k[:, :, :context_len], v[:, :, :context_len], lengths, has_block0=True,
                         anchor_len=min(anchor_size, context_len))
    parts += phase2_parts((context_len, total), k[:, :, :context_len], v[:, :, :context_len],
                          k[:, :, context_len:], v[:, :, context_len:])
    return parts_attention(q, parts, kernel, scale)


def can_fuse_anchor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> bool:
    """Whether phase 1 may use ``phase1_parts(fuse_anchor=True)`` here: no gradient is wanted (the
    fused form's backward is not used) and the kernel that ``backend`` picks aligns causal masks
    bottom-right (``Kernel.bottom_right_causal``, probed once per device type and dtype)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return select_kernel(backend, q, k).bottom_right_causal(q.device, q.dtype)


def local_attention(
    q: torch.Tensor, parts: list[Part], *, scale: float | None, backend: str, reducer: Reducer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``parts`` for ``q`` with the chosen backend; the distributed layer's entry to the math."""
    kernel = select_kernel(backend, q, parts[0].k if parts else q)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return parts_attention(q, parts, kernel, scale, reducer)
