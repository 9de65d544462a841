"""RULER's scores: string match against the reference answers, 0-100, case-insensitive."""

from __future__ import annotations


def score_all(prediction: str, answers: list[str] | tuple[str, ...]) -> float:
    """Share of the answers that occur in the prediction (every answer is needed for 100)."""
    pred = prediction.lower()
    return 100.0 * sum(a.lower() in pred for a in answers) / len(answers)


def score_part(prediction: str, answers: list[str] | tuple[str, ...]) -> float:
    """100 if any answer occurs in the prediction, else 0."""
    pred = prediction.lower()
    return 100.0 * any(a.lower() in pred for a in answers)


def score(prediction: str, answers, metric: str) -> float:
    if metric == "all":
        return score_all(prediction, answers)
    if metric == "part":
        return score_part(prediction, answers)
    raise ValueError(f"metric must be 'all' or 'part', got {metric!r}")
