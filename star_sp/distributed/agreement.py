"""One step that makes every rank agree on a call's settings, or raise the same error everywhere.

Each rank contributes a small dict of what must match across ranks (config, dtype, shapes) and the
error its own validation found, if any. After one ``all_gather_object`` every rank sees every
contribution, so every rank raises the same ``StarInputError`` naming the ranks at fault: a bad
argument on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import torch.distributed as dist

from ..errors import StarInputError


def agree(group: "dist.ProcessGroup", step: str, meta: dict, error: str | None) -> None:
    """Raise ``StarInputError`` on every rank if any rank reported ``error`` or the ``meta`` differ."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (meta, error), group=group)
    by_error: dict[str, list[int]] = {}
    for rank, (_, err) in enumerate(gathered):
        if err:
            by_error.setdefault(err, []).append(rank)
    if by_error:
        if len(by_error) == 1 and len(next(iter(by_error.values()))) == len(gathered):
            raise _everywhere(next(iter(by_error)))  # the same mistake everywhere: say it once
        raise _everywhere("; ".join(f"{err} (rank(s) {ranks})" for err, ranks in by_error.items()))
    reference = gathered[0][0]
    for rank, (other, _) in enumerate(gathered):
        for key in sorted(set(reference) | set(other)):
            if reference.get(key) != other.get(key):
                raise _everywhere(
                    f"{step}: ranks disagree on {key}: rank 0 has {reference.get(key)!r}, rank {rank} has "
                    f"{other.get(key)!r}; every rank must use the same config, dtype and tensor shapes"
                )


def agree_or_raise(group: "dist.ProcessGroup | None", step: str, meta: dict, error: str | None) -> None:
    """``agree`` as one guarded step of ``group``; with no group (one process), raise ``error`` if any."""
    if group is None:
        if error is not None:
            raise StarInputError(error)
        return
    from .guard import guarded_step

    with guarded_step(step, group):
        agree(group, step, meta, error)


def first_failure(group: "dist.ProcessGroup | None", error: str | None) -> str | None:
    """Every rank's outcome of a local attempt (``error``: None where it worked), gathered: the first
    failing rank's ``"rank r: error"``, the same on every rank, or None where every rank succeeded.
    For attempts each rank makes alone whose outcome the ranks must share (a CUDA graph capture
    that would otherwise leave the ranks running different steps)."""
    if group is None:
        return error
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, error, group=group)
    return next((f"rank {r}: {e}" for r, e in enumerate(gathered) if e), None)


def _everywhere(message: str) -> StarInputError:
    exc = StarInputError(message)
    exc.on_every_rank = True  # every rank raises this same error: nothing to tell the others
    return exc


def validated(fn, *args, **kwargs) -> str | None:
    """Run a local check; return its error message instead of raising it."""
    try:
        fn(*args, **kwargs)
    except (StarInputError, ValueError) as exc:
        return str(exc)
    return None
