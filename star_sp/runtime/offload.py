"""Activation offload: what activation checkpointing keeps for each recomputed layer (its inputs) waits in
CPU memory until the backward pass needs it.

``ActivationOffload(layers)`` gives each checkpoint call a context manager (``for_checkpoint(i)``, the
``i``-th checkpointed layer or chunk of the forward): inside it, every tensor autograd saves of at
least ``min_bytes`` is copied to host memory, and copied back when the backward pass unpacks it.
``layers``: how many checkpoints offload, the first ones (their inputs wait longest); None: all. A
partial offload splits the checkpoints between the GPU and the host where neither holds them all.

Host memory on CUDA is pinned (copies overlap compute), by registering buffers of exactly the tensor's
size (``cudaHostRegister``) and keeping them in a pool for the next steps: torch's pinned allocator
rounds every buffer up to a power of two, 1.6x the memory for a 2.5 GB layer input. A tensor saved by
several checkpoints (the RoPE table each layer takes) is copied once while its source lives. On CPU the
tensors are copied too (the same code path, for tests), unpinned.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict

import torch

MIN_BYTES = 1 << 20
"""Saved tensors smaller than this stay where they are (a copy would cost more than it saves)."""


class _HostPool:
    """Host buffers by byte size, pinned when CUDA allows it, reused from step to step."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self.pinned_bytes = 0

    def take(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
        with self._lock:
            free = self._free.get((nbytes, pin))
            if free:
                return free.pop(), pin
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if pin and nbytes:
            ok = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0
            if not ok:  # e.g. the host's locked-memory limit: an unpinned buffer still works, synchronously
                return buf, False
            weakref.finalize(buf, torch.cuda.cudart().cudaHostUnregister, buf.data_ptr())
            self.pinned_bytes += nbytes
        return buf, pin

    def give_back(self, buf: torch.Tensor, pinned: bool) -> None:
        with self._lock:
            self._free[(buf.numel(), pinned)].append(buf)

    def clear(self) -> None:
        """Let the pooled buffers go (their memory returns to the host once no step holds them)."""
        with self._lock:
            self._free.clear()
            self.pinned_bytes = 0


HOST_POOL = _HostPool()


class _Packed:
    """One offloaded tensor: its host copy (a view of a pool buffer) and where it came from. The buffer
    returns to the pool when autograd lets this go."""

    __slots__ = ("device", "host", "pinned", "__weakref__")

    def __init__(self, device: torch.device, host: torch.Tensor, pinned: bool, buf: torch.Tensor):
        self.device, self.host, self.pinned = device, host, pinned
        weakref.finalize(self, HOST_POOL.give_back, buf, pinned)


class ActivationOffload:
    """Saved-tensor hooks that move the checkpoints' kept tensors to host memory (module docstring)."""

    def __init__(self, layers: int | None = None, min_bytes: int | None = None):
        self.layers = layers
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.offloaded_bytes = 0  # what went to the host in this forward (the copies once), for reports and tests
        self.offloaded_checkpoints: list[int] = []
        self._seen: dict[tuple, tuple[weakref.ref, _Packed]] = {}

    def for_checkpoint(self, index: int):
        """The context the ``index``-th checkpoint call of the forward runs its checkpoint in."""
        if self.layers is not None and index >= self.layers:
            return contextlib.nullcontext()
        self.offloaded_checkpoints.append(index)
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def done(self) -> None:
        """After the forward: forget the copies made (the backward pass holds what it needs)."""
        self._seen.clear()

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or t.is_sparse or t.layout != torch.strided:
            return t
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is t:  # the same tensor, alive and unchanged: its copy
            return seen[1]
        pin = t.device.type == "cuda"
        buf, pinned = HOST_POOL.take(nbytes, pin)
        host = buf.view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=pinned)
        packed = _Packed(t.device, host, pinned, buf)
        self._seen[key] = (weakref.ref(t), packed)
        self.offloaded_bytes += nbytes
        return packed

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _Packed):
            return packed
        if packed.device.type == "cpu":
            return packed.host.clone()  # the buffer goes back to the pool: the tensor must not share it
        return packed.host.to(packed.device, non_blocking=packed.pinned)


def offload_layers(value) -> "int | None | bool":
    """``offload_activations`` as a count of checkpoints: True -> None (all), False or 0 -> False (off),
    a whole number n > 0 -> n (the first n)."""
    if isinstance(value, bool):
        return None if value else False
    return value if value else False


__all__ = ["HOST_POOL", "MIN_BYTES", "ActivationOffload", "offload_layers"]
