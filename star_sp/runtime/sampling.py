"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

Pure functions of the logits and a ``torch.Generator``; the engine runs them on the query host and
broadcasts the result, so every rank continues with the same token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import is_integer, is_number
from ..errors import StarInputError

_SEED_RANGE = "an integer from -2**63 to 2**64 - 1 (what torch.Generator.manual_seed takes)"


def _is_seed(value: object) -> bool:
    """An integer ``torch.Generator.manual_seed`` takes."""
    return is_integer(value) and -2 ** 63 <= value < 2 ** 64


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
    """Seed of each sequence's sampling generator (the same on every rank): a sequence samples what it
    samples alone, whatever else is in the batch. So the same question repeated in a batch samples the
    same tokens in every row: give ``seeds`` to draw different samples (best-of-n)."""
    seeds: tuple[int, ...] | None = None
    """One seed per sequence (several questions of one context), instead of ``seed`` for every one."""

    def __post_init__(self) -> None:
        temperature, top_p = self.temperature, self.top_p
        if not is_number(temperature) or not math.isfinite(temperature) or (self.do_sample and temperature <= 0):
            raise StarInputError(f"temperature must be a finite number (> 0 when sampling), got {temperature!r}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise StarInputError(f"top_k must be a non-negative integer (0 keeps every token), got {self.top_k!r}")
        if not is_number(top_p) or not 0 < top_p <= 1:  # NaN fails the comparison
            raise StarInputError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if not _is_seed(self.seed):
            raise StarInputError(f"seed must be {_SEED_RANGE}, got {self.seed!r}")
        if self.seeds is not None and (not isinstance(self.seeds, (tuple, list)) or not self.seeds
                                       or not all(map(_is_seed, self.seeds))):
            raise StarInputError(f"seeds must be a non-empty tuple of integers, each {_SEED_RANGE}, got {self.seeds!r}")

    def seeds_error(self, batch: int) -> str | None:
        """What is wrong with ``seeds`` for a batch of ``batch`` sequences, or None."""
        if self.seeds is not None and len(self.seeds) != batch:
            return (f"sampling.seeds holds {len(self.seeds)} seeds for {batch} sequences; give one per sequence (or "
                    "seed= for all)")
        return None

    def generators(self, batch: int, device) -> list[torch.Generator] | None:
        """One generator per sequence (None when greedy); ``seeds`` must then hold ``batch`` seeds."""
        if not self.do_sample:
            return None
        error = self.seeds_error(batch)
        if error is not None:
            raise StarInputError(error)
        seeds = [self.seed] * batch if self.seeds is None else list(self.seeds)
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                generator: "torch.Generator | list[torch.Generator] | None") -> torch.Tensor:
    """``logits: (B, V)`` -> token ids ``(B,)``; ``generator`` (one for the batch, or one per sequence) must
    be on the logits' device."""
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
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
