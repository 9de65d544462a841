"""The inputs every framework adapter checks the same way: token ids, several questions of different
lengths, the query rows' positions, and the positions a model can take.

Shapes: context and query ids ``(batch, tokens)`` LongTensors; a list of questions ``[(L_i,) or
(1, L_i)]`` is left-padded into ``(Q, max L_i)`` (padding is never attended: the query KV masks the first
``starts[i]`` keys of row ``i``). Each check returns ``None`` or one line that says what to pass instead,
so the caller can agree on it across ranks before any collective.
"""

from __future__ import annotations

import torch


def check_ids(name: str, ids, vocab_size: int) -> str | None:
    """``None``, or one line saying why ``ids`` is not a ``(batch, tokens)`` LongTensor of the model's vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32):
        return f"{name} must be a LongTensor of token ids, shape (batch, tokens), got {type(ids).__name__}" + (
            f" of {ids.dtype}" if isinstance(ids, torch.Tensor) else "")
    if ids.dim() != 2 or ids.shape[0] == 0:
        return f"{name} must have shape (batch, tokens) with batch >= 1, got {tuple(ids.shape)}"
    if ids.shape[1] == 0:
        return f"{name} is empty: pass at least one token"
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return (f"{name} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids (0 to "
                f"{vocab_size - 1}); encode the text with the model's own tokenizer")
    return None


def fingerprint(ids: torch.Tensor) -> int:
    """A cheap hash of the ids and their shape: the ranks compare it to agree that they got the same input."""
    flat = ids.detach().reshape(-1).long().cpu()
    weights = torch.arange(flat.numel(), dtype=torch.long) * 7919 + 104729
    return int(((flat + 1) * weights % 2305843009213693951).sum() % 2305843009213693951) ^ hash(tuple(ids.shape))


def questions(query_ids) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """``(ids, starts, error)``: a list of questions of different lengths (each ``(L_i,)`` or ``(1, L_i)``)
    left-padded into ``ids (Q, max L_i)`` with ``starts[i] = max L - L_i`` padding tokens (id 0, never
    attended); a tensor passes through with ``starts = None``."""
    if not isinstance(query_ids, (list, tuple)):
        return query_ids, None, None
    if not query_ids:
        return query_ids, None, "query_ids is an empty list: pass at least one question"
    rows = []
    for i, q in enumerate(query_ids):
        if not isinstance(q, torch.Tensor) or q.dtype not in (torch.long, torch.int, torch.int32) or not (
                q.dim() == 1 or (q.dim() == 2 and q.shape[0] == 1)):
            return query_ids, None, (f"question {i} of the list must be a LongTensor of token ids, shape (tokens,) "
                                     f"or (1, tokens), got {type(q).__name__}"
                                     + (f" of shape {tuple(q.shape)}" if isinstance(q, torch.Tensor) else ""))
        if q.numel() == 0:
            return query_ids, None, f"question {i} of the list is empty: every question needs at least one token"
        rows.append(q.reshape(-1).long())
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
    return ids, torch.tensor([width - len(r) for r in rows]), None


def query_positions(context_lens: list[int], lq: int, starts: torch.Tensor | None) -> torch.Tensor:
    """Positions of the query rows: ``(Lq,)`` when every sequence's query follows a context of one
    length, else ``(S, Lq)``: sequence ``i``'s tokens right after its context (``context_lens[i]``), its
    left padding (``starts[i]`` tokens, unread) at the context's length."""
    steps = torch.arange(lq)
    if starts is None and len(set(context_lens)) == 1:
        return context_lens[0] + steps
    pad = torch.zeros(len(context_lens), dtype=torch.long) if starts is None else starts
    return torch.tensor(context_lens)[:, None] + (steps[None, :] - pad[:, None]).clamp(min=0)


def positions_limit(config) -> int | None:
    """The positions a model can take: ``max_position_embeddings``, or, with rope scaling over an original
    length (YaRN and the like, as Qwen2.5 ships it: 32768 x 4), the original length times the factor if
    that is more."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor, original = rope.get("factor"), rope.get("original_max_position_embeddings")
    if isinstance(factor, (int, float)) and isinstance(original, int):
        limit = max(limit, int(original * factor))
    return limit
