"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

Pure functions of the logits and a ``torch.Generator``; the engine runs them on the query host and
broadcasts the result, so every rank continues with the same token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import StarInputError


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How ``generate`` picks tokens. ``do_sample=False`` is greedy and ignores the rest."""

    do_sample: bool = False
    temperature: float = 1.0
    """Divides the logits; must be > 0 when sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability adds up to at least top_p (1.0: all)."""
    seed: int = 0
    """Seed of the sampling generator (the same on every rank)."""

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise StarInputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise StarInputError(f"top_k must be a non-negative integer (0 keeps every token), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise StarInputError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``logits: (B, V)`` -> token ids ``(B,)``; ``generator`` must be on the logits' device."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
