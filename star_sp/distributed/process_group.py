"""Starting the process group under torchrun or the deepspeed launcher (one process per host)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when a launcher (torchrun, deepspeed) started this process as one of several."""
    return all(v in os.environ for v in LAUNCHER_VARS)


def init_from_env(timeout_s: float, device: str = "auto") -> tuple["dist.ProcessGroup | None", torch.device, bool]:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU) with a bounded collective timeout,
    and pick this process's device (``cuda:LOCAL_RANK`` when CUDA is used). Returns ``(group, device,
    created)``: an already initialized default group is used as it is (``created`` False); without a
    launcher and without a group, ``(None, device, False)``."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if device not in ("auto", "cuda", "cpu"):
        dev = torch.device(device)
    if dist.is_initialized():
        return dist.group.WORLD, dev, False
    if not launched():
        return None, dev, False
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev if use_cuda else None)
    return dist.group.WORLD, dev, True


def close_process_group(ok: bool, timeout_s: float = 60.0) -> None:
    """Leave the default process group. After a run that ended well on this rank (``ok``), first meet
    the other ranks at a barrier (at most ``timeout_s``): a rank that tore its gloo connections down
    while a peer was still finishing the last collective made that peer abort at exit ("terminate
    called without an active exception") now and then. After an error, leave at once: a peer may be
    gone, and waiting for it would only delay the exit."""
    if ok:
        try:
            dist.barrier(async_op=True).wait(datetime.timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
            pass
    dist.destroy_process_group()
