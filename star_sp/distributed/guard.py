"""Group-wide steps that end with a clear error on every rank instead of hanging.

``guarded_step(name, group)`` wraps one step (local work plus its collectives). If the step raises on
one rank, that rank records ``(step, message)`` under its rank and the group's name in the default
group's key-value store and raises ``StarCollectiveError`` (an input error keeps its type). The other ranks are then blocked in a collective, which fails when the
failed process exits (gloo and NCCL notice a closed peer) or, at the latest, when the collective's
timeout runs out; they read the record and raise ``StarCollectiveError`` naming the failed rank and
its step (ranks are group ranks). If no rank left a record (a rank was killed, or is stuck outside
star-sp), the error says so and names the step this rank was in. Records are not cleared: after a
``StarCollectiveError`` the group is not to be used again.
"""

from __future__ import annotations

import contextlib
import datetime
import traceback

import torch
import torch.distributed as dist

from .._compat import default_store
from ..errors import StarCollectiveError, StarInputError


def _key(group, global_rank: int) -> str:
    return f"star_sp/failure/{getattr(group, 'group_name', 'default')}/{global_rank}"


def _record(store, group, global_rank: int, step: str, message: str) -> None:
    try:
        store.set(_key(group, global_rank), f"{step}\x00{message}")
    except Exception:  # noqa: BLE001 - the store may be gone with a dead rank 0
        pass


def _read_failure(store, group, me: int) -> tuple[int, str, str] | None:
    """The first recorded failure of another rank of ``group``: (group rank, step, message)."""
    try:
        for group_rank, global_rank in enumerate(dist.get_process_group_ranks(group)):
            key = _key(group, global_rank)
            if global_rank != me and store.check([key]):
                step, message = store.get(key).decode().split("\x00", 1)
                return group_rank, step, message
    except Exception:  # noqa: BLE001
        return None
    return None


@contextlib.contextmanager
def guarded_step(step: str, group: "dist.ProcessGroup | None"):
    """Run one group-wide step; any failure becomes a ``StarCollectiveError`` on every rank."""
    try:
        yield
    except StarCollectiveError:
        raise  # already translated by an inner step
    except StarInputError as exc:
        if not getattr(exc, "on_every_rank", False) and group is not None and dist.is_initialized():
            store = default_store()  # raised here alone: tell the others, keep the error's type here
            if store is not None:
                _record(store, group, dist.get_rank(), step, f"StarInputError: {exc}".splitlines()[0][:500])
        raise
    except Exception as exc:  # noqa: BLE001
        if group is None or not dist.is_initialized() or type(exc).__name__ == "_StopRecomputationError":
            raise  # (the last: torch.utils.checkpoint ending a recomputation early, no failure)
        rank, me = dist.get_rank(group), dist.get_rank()
        store = default_store()
        peer = _read_failure(store, group, me) if store is not None else None
        if peer is not None:
            raise StarCollectiveError(
                f"rank {rank}: step '{step}' stopped because rank {peer[0]} failed in step '{peer[1]}': {peer[2]}",
                step=step, failed_rank=peer[0],
            ) from exc
        message = f"{type(exc).__name__}: {exc}".strip()
        if isinstance(exc, RuntimeError) and _looks_like_collective_failure(exc):
            raise StarCollectiveError(
                f"rank {rank}: step '{step}' failed in a collective and no rank reported an error: a rank was "
                f"killed, timed out, or is stuck outside star-sp. Look at the other ranks' logs. ({message})",
                step=step,
            ) from exc
        if store is not None:
            _record(store, group, me, step, message.splitlines()[0][:500])
        raise StarCollectiveError(
            f"rank {rank} failed in step '{step}': {message}\n{''.join(traceback.format_tb(exc.__traceback__)[-3:])}",
            step=step, failed_rank=rank,
        ) from exc


def _looks_like_collective_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    markers = ("timed out", "timeout", "connection", "closed", "peer", "gloo", "nccl", "broken pipe", "reset")
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(m in text for m in markers)


def wait(work, timeout_s: float | None, tensor: torch.Tensor) -> None:
    """Wait for an async collective; on CPU (gloo) with an explicit timeout, on CUDA let the stream
    order it (NCCL's watchdog enforces the group's timeout there, without a host sync here)."""
    if tensor.device.type == "cpu" and timeout_s is not None:
        work.wait(datetime.timedelta(seconds=timeout_s))
    else:
        work.wait()
