"""One decode loop for every framework adapter (the split of gpt-fast: prefill / one decode step /
generate): the adapter gives the forward of one step, this loop chooses the tokens, decides who stops
and tells every rank.

``forward(step, ids) -> logits (B, V)`` on the query host (``None`` on the others) runs step ``step``:
step 0 the question rows ``ids (B, Lq)``, later steps the last chosen tokens ``(B, 1)``. The query host
(or the one process) picks the next tokens (greedy or sampled, ``SamplingConfig``), marks a sequence
finished at an EOS id or a stop string (``StopRule``) and pads it from then on; with several processes
it broadcasts both to every rank (``broadcast_tokens``: a failure there reaches every rank as the same
error at once), so every rank returns the same ``LongTensor[B, T]``, ``T <= max_new_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..distributed.collectives import broadcast_tokens
from .sampling import SamplingConfig, next_tokens


@dataclass
class StopRule:
    """When a sequence stops: at one of ``eos`` ids, or when its recent text holds one of ``stop_strings``
    (decoded with ``tokenizer``). A finished sequence is padded with ``pad``."""

    eos: list[int]
    pad: int
    stop_strings: list[str] | None = None
    tokenizer: object = None

    @classmethod
    def make(cls, eos_token_id: int | list[int] | None, pad_token_id: int | None = None,
             stop_strings: list[str] | None = None, tokenizer=None) -> "StopRule":
        """``pad`` defaults to the first EOS id, else 0."""
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        return cls(eos, pad_token_id if pad_token_id is not None else (eos[0] if eos else 0), stop_strings or None,
                   tokenizer)

    def finished(self, finished: torch.Tensor, tokens: list[torch.Tensor], chosen: torch.Tensor) -> torch.Tensor:
        """``finished (B,)`` after ``chosen (B,)`` follows the earlier ``tokens`` (each ``(B,)``)."""
        done = finished.clone()
        for e in self.eos:
            done |= chosen == e
        if self.stop_strings:
            window = max(len(s) for s in self.stop_strings) + 8  # tokens enough to hold the longest string
            recent = torch.stack(tokens[-window:] + [chosen], 1)
            texts = self.tokenizer.batch_decode(recent[:, -window:], skip_special_tokens=False)
            done |= torch.tensor([any(s in t for s in self.stop_strings) for t in texts])
        return done


def decode_tokens(forward: Callable[[int, torch.Tensor], "torch.Tensor | None"], query_ids: torch.Tensor,
                  max_new_tokens: int, *, holds: bool, group, src: int, device: torch.device,
                  sampling: SamplingConfig, stop: StopRule, timeout_s: float | None,
                  sync: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, float]:
    """Decode up to ``max_new_tokens`` after ``query_ids (B, Lq)``; ``holds``: this rank chooses the tokens
    (group rank ``src`` of ``group``, or the one process when ``group`` is None). Returns the new tokens
    ``LongTensor[B, T]`` (CPU) and the ``time.perf_counter()`` at which the first one was known (after
    ``sync()``)."""
    batch = query_ids.shape[0]
    generator = sampling.generators(batch, device) if holds else None
    finished = torch.zeros(batch, dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    ids, first = query_ids, None
    for step in range(max_new_tokens):
        logits = forward(step, ids)
        chosen = done = failure = None
        if holds:
            try:
                chosen = torch.where(finished, stop.pad, next_tokens(logits, sampling, generator).cpu())
                done = stop.finished(finished, tokens, chosen)
            except Exception as exc:  # noqa: BLE001 - reaches every rank through the broadcast below
                if group is None:
                    raise
                failure = exc
        # the other hosts only lend their context KV (no language-model head) and receive the choice
        if group is not None:
            chosen, done = broadcast_tokens(chosen, done, src=src, group=group, device=device, batch=batch,
                                            error=failure, timeout_s=timeout_s)
        finished = done
        tokens.append(chosen)
        if first is None:
            sync()
            first = time.perf_counter()
        if bool(finished.all()):
            break
        ids = chosen.unsqueeze(1)
    return torch.stack(tokens, dim=1), first
