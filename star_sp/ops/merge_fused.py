"""``merge_into_`` as one fused GPU kernel (Triton), for forward passes on CUDA.

Same contract as ``ops.merge.merge_into_``: ``out_acc: (B, H, S, D)`` and ``lse_acc: (B, H, S)`` are
updated in place with one more partial ``out: (B, H, S, D)``, ``lse: (B, H, S)`` (natural-log
log-sum-exps), by ``ops/merge.py``'s formula with two terms::

    m = max(s_acc, s_new);  w = exp(s - m) / (exp(s_acc - m) + exp(s_new - m));  O = w_acc O_acc + w_new O_new
    s = m + log(exp(s_acc - m) + exp(s_new - m))

Any strides (the last dimension of ``out_acc`` and ``out`` contiguous), float16, bfloat16 or float32
(float64 is left to the torch form, which keeps its precision). The weights and the weighted sum are
computed in float32 and rounded once, when stored. So with ``out_acc`` in bfloat16 a row that receives
exactly two partials (a Star block: its own keys and the anchor's) gets the same bits as this kernel
with a float32 accumulator rounded at the end; and the pass reads each output once and writes once,
where the torch form makes four passes over a float32 accumulator. A row that is ``-inf`` in both
stays ``O = 0, s = -inf``.

``fused_merge_available(t)`` says whether this path can run (a CUDA tensor and Triton importable);
``merge_into_`` uses it by itself, so callers need not.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def fused_merge_available(t: torch.Tensor) -> bool:
    """Whether ``merge_into_fused`` can run on tensors like ``t``."""
    return t.is_cuda and _triton() is not None


@functools.cache
def _kernel():
    triton, tl = _triton()

    @triton.jit
    def merge(acc, lacc, o, lo, H, S, D, CHUNKS,
              s_ab, s_ah, s_as, s_lab, s_lah, s_las, s_ob, s_oh, s_os, s_lb, s_lh, s_ls,
              ROWS: tl.constexpr, COLS: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a 1M-token output has more than 2^31 elements
        bh, chunk = pid // CHUNKS, pid % CHUNKS  # one flat grid: no per-axis launch limit on B * H
        b, h = bh // H, bh % H
        rows = chunk * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        rmask = rows < S
        mask = rmask[:, None] & (cols[None, :] < D)
        la = tl.load(lacc + b * s_lab + h * s_lah + rows * s_las, mask=rmask, other=float("-inf")).to(tl.float32)
        ln = tl.load(lo + b * s_lb + h * s_lh + rows * s_ls, mask=rmask, other=float("-inf")).to(tl.float32)
        m = tl.maximum(la, ln)
        m = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(la - m)
        wn = tl.exp(ln - m)
        den = wa + wn
        keys = den > 0
        den = tl.where(keys, den, 1.0)
        wa = wa / den
        wn = wn / den
        pa = acc + b * s_ab + h * s_ah + rows[:, None] * s_as + cols[None, :]
        po = o + b * s_ob + h * s_oh + rows[:, None] * s_os + cols[None, :]
        xa = tl.load(pa, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(po, mask=mask, other=0.0).to(tl.float32)
        res = tl.where(wa[:, None] > 0, xa * wa[:, None], 0.0) + tl.where(wn[:, None] > 0, xo * wn[:, None], 0.0)
        tl.store(pa, res.to(pa.dtype.element_ty), mask=mask)
        new = tl.where(keys, m + tl.log(den), float("-inf"))
        tl.store(lacc + b * s_lab + h * s_lah + rows * s_las, new.to(lacc.dtype.element_ty), mask=rmask)

    return merge, triton


def merge_into_fused(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> bool:
    """Run the fused merge if the inputs allow it (4-D outputs, last dimension contiguous, same device);
    returns False, touching nothing, when they do not."""
    shapes_fit = out.shape == out_acc.shape and lse.shape == lse_acc.shape == out_acc.shape[:3]
    if out_acc.dim() != 4 or not shapes_fit:
        return False
    if torch.float64 in (out_acc.dtype, lse_acc.dtype, out.dtype, lse.dtype):
        return False  # the kernel computes in float32; float64 keeps its precision on the torch path
    if out_acc.stride(-1) != 1 or out.stride(-1) != 1 or out_acc.numel() == 0 or not fused_merge_available(out_acc):
        return False
    kernel, triton = _kernel()
    b, h, s, d = out_acc.shape
    rows = 64 if d <= 128 else 32
    chunks = triton.cdiv(s, rows)
    strides = (*out_acc.stride()[:3], *lse_acc.stride(), *out.stride()[:3], *lse.stride())
    kernel[(chunks * b * h,)](out_acc, lse_acc, out, lse, h, s, d, chunks, *strides,
                              ROWS=rows, COLS=triton.next_power_of_2(d), num_warps=4)
    return True
