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
