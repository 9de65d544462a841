"""How the ``star-sp`` command reports a user error and Ctrl-C across ranks.

A user error becomes the same error on every rank (``run_on_every_rank``, ``same_everywhere``), is printed as one
line, once, by the first process of each host (``report``), and under torchrun is also the root cause at
the end of torchrun's failure report. Ctrl-C ends every process at once with exit code 130
(``exit_on_interrupt``). Lines start with the program's name, ``prog``: ``star-sp`` for the command,
``star-sp finetune`` for the fine-tuning job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time

import torch.distributed as dist

from ..errors import StarInputError

PROG = "star-sp"


def run_on_every_rank(group, step: str, fn):
    """Run ``fn`` on every rank; if it fails anywhere, raise the same error everywhere."""
    from ..distributed.agreement import agree

    try:
        result, error = fn(), None
    except StarInputError as exc:
        result, error = None, str(exc)
    if group is None:
        if error:
            raise StarInputError(error)
        return result
    agree(group, step, {}, error)
    return result


def same_everywhere(fn):
    """Run ``fn``, which depends only on the command line and the files it names (the same on every
    rank): an error it raises is the same on every rank, so one process reports it."""
    try:
        return fn()
    except StarInputError as exc:
        on_every_rank(exc)
        raise


def on_every_rank(exc: StarInputError) -> StarInputError:
    exc.on_every_rank = True  # as distributed.agreement marks the errors every rank raises alike
    return exc


def _rank() -> int:
    """This process's rank: in the process group, else the launcher's RANK, else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def prints_for_host(rank: int) -> bool:
    """Whether this process prints what every process knows: the first process of its host."""
    return int(os.environ.get("LOCAL_RANK", rank)) == 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


SILENT_EXIT_DELAY_S = 3.0


def report(line: str, *, everywhere: bool, prog: str = PROG, exiting: bool = False) -> None:
    """Print ``line`` (``"{prog}: ..."``) on stderr: once when every rank has the same line, else on each
    rank, marked with its rank (``"{prog} (rank 1): ..."``). Under torchrun the line also goes to this
    rank's error file, which torchrun shows as the root cause at the end of its failure report."""
    rank = _rank()
    if not everywhere and _world() > 1:
        line = line.replace(f"{prog}:", f"{prog} (rank {rank}):", 1)
    if not everywhere or prints_for_host(rank):
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            json.dump(record, f)
    if exiting and everywhere and _world() > 1 and not prints_for_host(rank):
        # a rank that stays silent leaves the line to the first process of its host; if it exited first, the
        # launcher would stop that process before it printed (torchrun ends the others when one fails)
        time.sleep(SILENT_EXIT_DELAY_S)


def _interrupted(prog: str, signum, frame) -> None:
    report(f"{prog}: interrupted", everywhere=True, prog=prog)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(130)


@contextlib.contextmanager
def exit_on_interrupt(prog: str = PROG):
    """Ctrl-C ends the command at once: one line (``"{prog}: interrupted"``), exit code 130, on every
    rank. A handler that exits, not the usual KeyboardInterrupt: that exception can be lost (raised
    inside a ``__del__`` it is only printed) and a rank that goes on alone keeps its peers waiting
    until the launcher kills them."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started to ignore Ctrl-C (nohup, cmd &): keep it so
            raise ValueError
        previous = signal.signal(signal.SIGINT, functools.partial(_interrupted, prog))
    except ValueError:  # that, or not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
