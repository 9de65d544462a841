"""A pool of gloo processes for multi-process tests, kept alive across tests of one session.

``Cluster(n).run(fn, *args)`` calls ``fn(group, *args)`` on every rank (``fn`` must live in an
importable module, here ``tests/workers.py``) and returns the ranks' results in rank order; a rank
that raises fails the call with that rank's traceback; a call that does not finish in ``timeout_s``
kills the pool and fails.
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import sys
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


def _serve(rank: int, world_size: int, port: int, inbox, outbox, timeout_s: float) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    torch.set_num_threads(1)
    group = init_gloo(rank, world_size, port, timeout_s)
    while True:
        task = inbox.get()
        if task is None:
            break
        module, name, args = task
        try:
            fn = getattr(importlib.import_module(module), name)
            outbox.put((rank, True, fn(group, *args)))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outbox.put((rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))


class Cluster:
    def __init__(self, world_size: int, timeout_s: float = 30.0):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_serve, args=(r, world_size, port, self.inboxes[r], self.outbox, timeout_s),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run_raw(self, fn, *args, timeout_s: float = 120.0) -> list:
        """Per rank ``(ok, result_or_error)``; kills the pool on a timeout."""
        for inbox in self.inboxes:
            inbox.put((fn.__module__, fn.__name__, args))
        results: dict[int, tuple] = {}
        try:
            while len(results) < self.world_size:
                rank, ok, value = self.outbox.get(timeout=timeout_s)
                results[rank] = (ok, value)
        except queue.Empty:
            self.close(force=True)
            raise AssertionError(f"{fn.__name__} did not finish on ranks "
                                 f"{sorted(set(range(self.world_size)) - set(results))} within {timeout_s} s")
        return [results[r] for r in range(self.world_size)]

    def run(self, fn, *args, timeout_s: float = 120.0) -> list:
        raw = self.run_raw(fn, *args, timeout_s=timeout_s)
        failures = [f"rank {r}: {v[2]}" for r, (ok, v) in enumerate(raw) if not ok]
        if failures:
            raise AssertionError("\n".join(failures))
        return [v for _, v in raw]

    def close(self, force: bool = False) -> None:
        for inbox, p in zip(self.inboxes, self.procs):
            if p.is_alive() and not force:
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
