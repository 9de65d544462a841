"""Activation offload: what activation checkpointing keeps for each recomputed layer (its inputs) waits in
CPU memory until the backward pass needs it.

``ActivationOffload(layers)`` gives each checkpoint call a context manager (``for_checkpoint(i)``, the
``i``-th checkpointed layer or chunk of the forward): inside it, every tensor autograd saves of at
least ``min_bytes`` is copied to host memory, and copied back when the backward pass unpacks it.
``layers``: how many checkpoints offload, the first ones (their inputs wait longest); None: all. A
partial offload splits the checkpoints between the GPU and the host where neither holds them all.

Host memory on CUDA is pinned (the copies do not block the host; they are queued on the compute stream,
in order with the kernels that make and reuse the device memory: the hooks assume one stream). Buffers
are registered with ``cudaHostRegister`` in size classes of at most 1/8 over the tensor (torch's pinned
allocator rounds to a power of two, up to 2x: 1.6x for a 2.5 GB layer input) and pooled from step to
step; at the end of each forward the pooled buffers that forward did not take are released, so the pool
follows the steps' sizes. A tensor saved by several checkpoints (the RoPE table each layer takes) is
copied once while its source lives. On CPU the tensors are copied too (the same code path, for tests),
unpinned.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict

import torch

from ..errors import StarError

MIN_BYTES = 1 << 20
"""Saved tensors smaller than this stay where they are (a copy would cost more than it saves)."""


def size_class(nbytes: int) -> int:
    """The buffer size that serves ``nbytes``: rounded up to a multiple of 1/8 of its power of two (at
    most 12.5% more), so that tensors of nearby sizes share buffers from step to step."""
    if nbytes <= 4096:
        return 4096
    step = 1 << (nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


def _unregister(ptr: int, pool: "_HostPool", nbytes: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
    pool.registered_bytes -= nbytes


class _HostPool:
    """Host buffers by size class (``size_class``), pinned on CUDA, reused from step to step."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self.registered_bytes = 0
        """Pinned bytes registered now, in the pool or held by a step."""
        self.allocations = 0
        """Buffers allocated so far (a step that reuses the pool allocates none)."""

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A buffer of at least ``nbytes``, pinned for ``device`` when it is a CUDA device."""
        pin = device.type == "cuda"
        size = size_class(nbytes)
        with self._lock:
            free = self._free.get((size, pin))
            if free:
                return free.pop()
        buf = torch.empty(size, dtype=torch.uint8)
        self.allocations += 1
        if pin:
            with torch.cuda.device(device):
                code = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 1))  # portable
            if code != 0:
                raise StarError(f"activation offload could not pin {size / 2**30:.2f} GiB of host memory (CUDA error "
                                f"{code}: {torch.cuda.cudart().cudaGetErrorString(code)}; "
                                f"{self.registered_bytes / 2**30:.1f} GiB pinned already): offload fewer layers "
                                "(offload_layers, or offload_activations=N), or raise the host's locked-memory limit")
            self.registered_bytes += size
            weakref.finalize(buf, _unregister, buf.data_ptr(), self, size)
        return buf

    def give_back(self, buf: torch.Tensor, pinned: bool) -> None:
        with self._lock:
            self._free[(buf.numel(), pinned)].append(buf)

    def trim(self) -> None:
        """Release the buffers in the pool (not those a step holds: they come back when it lets them go).
        Pinned ones only after the device's queued work: a copy back to the GPU may still read one."""
        with self._lock:
            pinned = any(pin and free for (_, pin), free in self._free.items())
            if pinned:
                torch.cuda.synchronize()
            self._free.clear()


HOST_POOL = _HostPool()


class _Packed:
    """One offloaded tensor: its host copy (a view of a pool buffer) and where it came from. The buffer
    returns to the pool when autograd lets this go."""

    __slots__ = ("device", "host", "pinned", "__weakref__")

    def __init__(self, device: torch.device, host: torch.Tensor, buf: torch.Tensor):
        self.device, self.host, self.pinned = device, host, device.type == "cuda"
        weakref.finalize(self, HOST_POOL.give_back, buf, self.pinned)


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
        """After the forward: forget the copies made (the backward pass holds what it needs) and release the
        pooled buffers this forward did not take."""
        self._seen.clear()
        HOST_POOL.trim()

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or t.is_sparse or t.layout != torch.strided:
            return t
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is t:  # the same tensor, alive and unchanged: its copy
            return seen[1]
        buf = HOST_POOL.take(nbytes, t.device)
        host = buf[:nbytes].view(t.dtype).view(t.shape)
        packed = _Packed(t.device, host, buf)
        host.copy_(t, non_blocking=packed.pinned)
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


def offload_error(value, unit: str = "layers") -> str | None:
    """What is wrong with a loss's ``offload_activations`` (True, False or a whole number of ``unit``), or None."""
    if isinstance(value, bool) or (isinstance(value, int) and value >= 0):
        return None
    return f"offload_activations must be True, False or a whole number of {unit} >= 0 (the first ones offload), got {value!r}"


def activation_offload(value: bool | int) -> "ActivationOffload | None":
    """The offload a loss's ``offload_activations`` asks for: True every checkpoint's, a whole number n > 0
    the first n's, False or 0 none (None)."""
    if not value:
        return None
    return ActivationOffload(None if value is True else value)


__all__ = ["HOST_POOL", "MIN_BYTES", "ActivationOffload", "activation_offload", "offload_error"]
