"""RULER-style evaluation: task generators, scoring, and the runner behind ``star-sp eval``."""

from .scoring import score, score_all, score_part
from .tasks import FAMILIES, TASKS, Sample, generate, resolve_tasks

__all__ = ["FAMILIES", "Sample", "TASKS", "generate", "resolve_tasks", "score", "score_all", "score_part"]
