"""Star Attention for transformers causal LMs: ``StarEngine`` (prefill, score, generate)."""

from .engine import StarEngine

__all__ = ["StarEngine"]
