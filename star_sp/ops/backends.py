"""Attention kernels that return the log-sum-exp, one small class per backend.

Every kernel computes, for ``q: (B, H, Sq, D)`` and ``k, v: (B, Hkv, Sk, D)`` with ``H % Hkv == 0``
(grouped-query attention: query head ``h`` reads KV head ``h // (H // Hkv)``)::

    out = softmax(scale * q @ k^T + mask) @ v        (B, H, Sq, D), dtype of q
    lse = logsumexp(scale * q @ k^T + mask, dim=-1)  (B, H, Sq), float32 (float64 for float64 input)

where ``mask`` is empty or, with ``causal=True``, the causal mask aligned bottom-right: row ``i`` of
``Sq`` sees keys ``0 .. Sk - Sq + i`` (``Sk >= Sq``; the ordinary causal mask when ``Sq == Sk``). Only
kernels whose ``bottom_right_causal`` probe says they align it so are given ``Sk > Sq`` with
``causal=True`` (phase 1's fused anchor calls, ``ops.phase1_parts(fuse_anchor=True)``); the others get
square causal calls only, longer key ranges being split into an unmasked prefix and a square causal
part (``ops.key_parts``; ``ops/parts.py`` refuses a rectangular causal part for them). The log is
natural. ``backward`` recomputes the probabilities from ``lse`` (which may be the log-sum-exp of a
larger, merged key set) and returns ``(dq, dk, dv)``.

Backends: ``cpu`` (aten's fused CPU flash kernel), ``flash``, ``cudnn``, ``efficient`` (aten's CUDA
kernels) and ``math`` (plain matrix products, any device and dtype; the honest "plain implementation"
for tolerances). ``select_kernel("auto", ...)`` picks the fastest that supports the inputs (on CUDA
cuDNN for prefill-sized calls, flash for calls with few query rows, and inside ``many_shapes()``); a named
backend that cannot run them raises ``BackendUnavailableError`` instead of falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from ..errors import BackendUnavailableError, StarInputError
from .merge import accumulation_dtype
from .softmax import group_heads, softmax_lse

aten = torch.ops.aten


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv_grad(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(dim=2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class Kernel:
    """One attention backend. Subclasses set ``name`` and implement the three methods."""

    name: str = ""
    native_gqa: bool = True

    def unsupported(self, q: torch.Tensor, k: torch.Tensor) -> str | None:
        """Why this backend cannot run these inputs, or ``None`` when it can."""
        raise NotImplementedError

    def forward(self, q, k, v, causal: bool, scale: float):
        """Returns ``(out, lse, aux)``; ``aux`` is whatever ``backward`` needs from the forward."""
        groups = q.shape[1] // k.shape[1]
        if not self.native_gqa:
            k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        q, k, v = map(_last_dim_contiguous, (q, k, v))
        return self._forward(q, k, v, causal, scale)

    def backward(self, dout, q, k, v, out, lse, aux, causal: bool, scale: float):
        groups = q.shape[1] // k.shape[1]
        if not self.native_gqa:
            k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        q, k, v = map(_last_dim_contiguous, (q, k, v))
        dq, dk, dv = self._backward(dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), aux, causal, scale)
        if not self.native_gqa:
            dk, dv = _reduce_kv_grad(dk, groups), _reduce_kv_grad(dv, groups)
        return dq, dk, dv

    def _forward(self, q, k, v, causal, scale):
        raise NotImplementedError

    def _backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        raise NotImplementedError

    def bottom_right_causal(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether ``causal=True`` with more keys than query rows aligns the mask bottom-right (row ``i``
        of ``Sq`` sees keys ``0 .. Sk - Sq + i``), found once per device type and dtype by running a
        small call against the same kernel's split form (an unmasked prefix and a square causal part,
        merged). Such calls save a merge (``ops.phase1_parts(fuse_anchor=True)``); a kernel that
        aligns top-left, or refuses the call, answers False and gets only square causal calls."""
        key = (torch.device(device).type, dtype)
        cache = self.__dict__.setdefault("_bottom_right", {})
        if key not in cache:
            cache[key] = self._probe_bottom_right(torch.device(device), dtype)
        return cache[key]

    def _probe_bottom_right(self, device: torch.device, dtype: torch.dtype) -> bool:
        from .merge import merge_partials

        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 64, 64, generator=gen).to(device, dtype)
        k, v = (torch.randn(1, 2, 160, 64, generator=gen).to(device, dtype) for _ in range(2))
        if self.unsupported(q, k) is not None:
            return False
        try:
            fused, _, _ = self.forward(q, k, v, True, 0.125)
            pre, pre_lse, _ = self.forward(q, k[:, :, :96], v[:, :, :96], False, 0.125)
            own, own_lse, _ = self.forward(q, k[:, :, 96:], v[:, :, 96:], True, 0.125)
        except RuntimeError:
            return False
        split, _ = merge_partials([(pre.float(), pre_lse), (own.float(), own_lse)])
        return bool((fused.float() - split).abs().max() < 0.05)


class CpuKernel(Kernel):
    """aten's fused CPU flash kernel. Its causal mask is aligned top-left (equal to bottom-right
    for the square blocks it is given here)."""

    name = "cpu"

    def unsupported(self, q, k):
        if q.device.type != "cpu":
            return f"the cpu kernel runs on CPU tensors, got {q.device}"
        if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"the cpu kernel takes float16/bfloat16/float32/float64, got {q.dtype}"
        return None

    def _forward(self, q, k, v, causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, None

    def _backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(accumulation_dtype(q.dtype)), 0.0, causal, scale=scale
        )


class _CudaKernel(Kernel):
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    max_head_dim: int = 256
    head_dim_multiple: int = 8

    def unsupported(self, q, k):
        if q.device.type != "cuda":
            return f"the {self.name} kernel runs on CUDA tensors, got {q.device}"
        if q.dtype not in self.dtypes:
            return f"the {self.name} kernel takes {[str(d) for d in self.dtypes]}, got {q.dtype}"
        d, multiple = q.shape[-1], self.head_dim_multiple_for(q.dtype)
        if d > self.max_head_dim or d % multiple:
            return (f"the {self.name} kernel takes {q.dtype} head dims that are multiples of {multiple} "
                    f"up to {self.max_head_dim}, got {d}")
        return None

    def head_dim_multiple_for(self, dtype: torch.dtype) -> int:
        return self.head_dim_multiple


class FlashKernel(_CudaKernel):
    name = "flash"

    def _forward(self, q, k, v, causal, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale
        )
        return out, lse, (cq, ck, mq, mk, seed, offset)

    def _backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        cq, ck, mq, mk, seed, offset = aux
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale
        )


class CudnnKernel(_CudaKernel):
    """cuDNN's fused attention, the fastest on Hopper. cuDNN refuses a call with one query and one key
    (``s_q = s_kv = 1``, e.g. a one-token block or a decode step's own key): such calls, and only
    those, run through the flash kernel."""

    name = "cudnn"
    max_head_dim = 128

    @staticmethod
    def _single(q, k) -> bool:
        return q.shape[2] == 1 and k.shape[2] == 1

    def _forward(self, q, k, v, causal, scale):
        if self._single(q, k):
            return KERNELS["flash"]._forward(q, k, v, causal, scale)
        out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        return out, lse.reshape(lse.shape[:3]), (cq, ck, mq, mk, seed, offset)

    def _backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        if self._single(q, k):
            return KERNELS["flash"]._backward(dout, q, k, v, out, lse, aux, causal, scale)
        cq, ck, mq, mk, seed, offset = aux
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cq, ck, mq, mk, 0.0, causal, scale=scale
        )


class EfficientKernel(_CudaKernel):
    """The memory-efficient kernel. Its backward reads ``out`` in the (B, S, H, D) memory layout that
    its forward writes (other strides give wrong gradients on torch 2.11, seen on an H200) and wants
    the log-sum-exp padded to a multiple of 32 rows. Head dims must be multiples of 8 in 16-bit types
    and of 4 in float32, as SDPA's own dispatch demands (a bf16 head dim of 12 finds no kernel on an
    H200: "cutlassF: no kernel found to launch")."""

    name = "efficient"
    native_gqa = False
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dim_multiple = 8
    lse_align = 32

    def head_dim_multiple_for(self, dtype: torch.dtype) -> int:
        return 4 if dtype == torch.float32 else self.head_dim_multiple

    def _forward(self, q, k, v, causal, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        return out, lse[..., : q.shape[2]], (seed, offset)

    def _backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        seed, offset = aux
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the kernel reads out as (B, S, H, D)
        pad = -lse.shape[-1] % self.lse_align
        lse = torch.nn.functional.pad(lse, (0, pad)).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv


class MathKernel(Kernel):
    """Plain matrix products (``ops/softmax.py``): scores in the input dtype, softmax statistics in
    float32 (float64 for float64 input). GQA without copying KV: the query heads of one KV head are
    stacked as rows. Its causal mask is aligned bottom-right for any ``Sk >= Sq``. Memory grows as
    ``H * Sq * Sk``: for tests, tolerances and decode steps (few rows), not long prefills."""

    name = "math"

    def unsupported(self, q, k):
        if not q.dtype.is_floating_point:
            return f"attention needs floating-point inputs, got {q.dtype}"
        return None

    @staticmethod
    def _probs(q, k, lse, causal, scale):
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq) if causal else None
        return softmax_lse(q, k, scale, keep, lse)

    def _forward(self, q, k, v, causal, scale):
        p, lse = self._probs(q, k, None, causal, scale)
        out = torch.matmul(group_heads(p.to(v.dtype), k.shape[1]), v)
        return out.view(q.shape[:3] + (v.shape[3],)), lse

    def forward(self, q, k, v, causal, scale):
        out, lse = self._forward(q, k, v, causal, scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        p, _ = self._probs(q, k, lse, causal, scale)
        acc, hkv = p.dtype, k.shape[1]
        pg = group_heads(p.to(dout.dtype), hkv)                       # (B, Hkv, g*Sq, Sk)
        dv = torch.matmul(pg.transpose(-1, -2), group_heads(dout, hkv))
        dp = torch.matmul(group_heads(dout, hkv), v.transpose(-1, -2)).to(acc).view_as(p)
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)
        ds = group_heads((p * (dp - delta) * scale).to(q.dtype), hkv)
        dq = torch.matmul(ds, k).view_as(q)
        dk = torch.matmul(ds.transpose(-1, -2), group_heads(q, hkv))
        return dq, dk, dv


KERNELS: dict[str, Kernel] = {
    kernel.name: kernel for kernel in (CpuKernel(), CudnnKernel(), FlashKernel(), EfficientKernel(), MathKernel())
}
AUTO_ORDER = {"cpu": ("cpu", "math"), "cuda": ("cudnn", "flash", "efficient", "math")}
# cuDNN builds an execution plan for every new shape; a decode step's keys grow by one every step, so
# calls with few query rows (decoding, short queries) go to flash, which has no per-shape cost.
CUDNN_MIN_ROWS = 64
# cuDNN's fused attention runs one thread block per (sequence, head, 128-row tile) and does not split
# the keys; flash splits them when there are few tiles. Many decode questions folded into rows over a
# long context (1 x 8 heads x 128 rows at Q = 32 on Llama-3.1-8B) give 8 tiles: on an H200's 132 SMs
# cuDNN took 65 ms per decode step, flash 14.
CUDNN_ROW_TILE = 128


def cudnn_fills(batch: int, heads: int, rows: int, sms: int) -> bool:
    """Whether a cuDNN call of ``(batch, heads, rows)`` query rows has a row tile for every SM and is
    long enough not to be a decode step (``rows >= CUDNN_MIN_ROWS``)."""
    return rows >= CUDNN_MIN_ROWS and batch * heads * -(-rows // CUDNN_ROW_TILE) >= sms


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_MANY_SHAPES = contextvars.ContextVar("star_sp_many_shapes", default=False)


@contextlib.contextmanager
def many_shapes():
    """Inside, ``auto`` (and torch's own ``scaled_dot_product_attention``, which the plain model calls)
    prefers kernels without a per-shape setup cost: flash first, cuDNN last. For work whose shapes
    change from call to call, such as training on samples of random lengths and block sizes: cuDNN
    builds an execution plan for every new shape, which costs more than the call itself (a 5.6M-parameter
    model's training step over 2K-16K tokens on an H200: 806 ms with cuDNN, 84 ms with flash)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    token = _MANY_SHAPES.set(True)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                          SDPBackend.CUDNN_ATTENTION], set_priority=True):
            yield
    finally:
        _MANY_SHAPES.reset(token)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``StarInputError`` unless q, k, v are (B, H, S, D) attention inputs that fit together."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise StarInputError(
            f"q, k, v must be 4-D (batch, heads, tokens, head_dim), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise StarInputError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise StarInputError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head_dim (dim 3)"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise StarInputError(
            f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise StarInputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise StarInputError(f"attention inputs must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise StarInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def select_kernel(backend: str, q: torch.Tensor, k: torch.Tensor) -> Kernel:
    """The kernel for ``backend`` (or the fastest suitable one for ``"auto"``)."""
    if backend == "auto":
        order = AUTO_ORDER.get(q.device.type, ("math",))
        if q.device.type == "cuda" and (_MANY_SHAPES.get() or not cudnn_fills(
                q.shape[0], q.shape[1], q.shape[2], _sm_count(q.device.index or 0))):
            order = ("flash", "cudnn", "efficient", "math")
        for name in order:
            if KERNELS[name].unsupported(q, k) is None:
                return KERNELS[name]
        raise BackendUnavailableError(f"no attention backend supports {q.dtype} inputs on {q.device}")
    if backend not in KERNELS:
        raise StarInputError(f"unknown attention backend {backend!r}; choose one of {('auto', *KERNELS)}")
    reason = KERNELS[backend].unsupported(q, k)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run these inputs: {reason}; "
                                      "pick another backend or 'auto'")
    return KERNELS[backend]
