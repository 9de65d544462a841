"""One decode step's attention in one split-KV pass (Triton): the context's KV and the step's own
(generated) KV read together, merged output and LSE out. ``StarConfig(decode_kernel="triton")`` runs
``runtime/passes.py: DecodeStepPass`` through it (its speed and its CUDA-graph capture are still to be
measured on a GPU).

    split_kv_decode(q, ctx_k, ctx_v, own_k, own_v, own_valid, scale) -> (out, lse)

- ``q: (B, H, R, D)``: ``R`` rows per sequence (1 for a decode step; several questions of one context
  fold into rows). Head ``h`` reads KV head ``h // (H / Hkv)``: the ``G = H / Hkv`` query heads of a KV
  head and the rows are one tile of ``G * R`` rows, so each KV head is read once per step.
- ``ctx_k, ctx_v: (Bc, Hkv, Lc, D)``, ``Bc`` = B or 1 (one context shared by every sequence), or None
  (no context keys on this host);
- ``own_k, own_v: (B, Hkv, C, D)``: the step's own KV buffer, slots where ``own_valid`` holds (bool,
  ``(C,)`` or ``(B, C)``, on the device: no host synchronisation; None: every slot), or None. Any
  layout whose last dimension is contiguous is read in place (no copy of the context's KV per step). Unwritten slots may hold
  anything, NaN included: they are never read into a sum.
- float32 inputs multiply in full float32 (not TF32), bf16/fp16 on tensor cores, accumulating in float32.
- ``out: (B, H, R, D)`` in q's dtype, ``lse: (B, H, R)`` in the accumulation dtype (float32; float64 for
  float64 inputs); a row with no key gets ``out = 0, lse = -inf`` (phase 2's merge across hosts takes it
  as it is).

The keys ``[context | own]`` are cut into ``splits`` runs, one program per (sequence and KV head, run);
a second kernel merges the runs' partial results by their LSE. No autograd (decode).
"""

from __future__ import annotations

import torch


def _triton():
    import triton
    import triton.language as tl

    return triton, tl


_KERNELS: dict = {}


def _kernels():
    """The two Triton kernels, built at first use (triton is imported lazily)."""
    if _KERNELS:
        return _KERNELS["partial"], _KERNELS["merge"]
    triton, tl = _triton()

    @triton.jit
    def partial(q_ptr, ck_ptr, cv_ptr, ok_ptr, ov_ptr, valid_ptr, o_ptr, lse_ptr,
                Hkv, M, D, Lc, C, chunk,
                sq_b, sq_h, sq_m, sck_b, sck_h, sck_n, scv_b, scv_h, scv_n, sok_b, sok_h, sok_n,
                sov_b, sov_h, sov_n, sv_b,
                CTX_SHARED: tl.constexpr, F64: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = (bh // Hkv).to(tl.int64)  # offsets in int64: a host's KV may exceed 2^31 elements
        h = (bh % Hkv).to(tl.int64)
        acc_t = tl.float64 if F64 else tl.float32
        rm = tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        rn = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rm[:, None] * sq_m + rd[None, :],
                    mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0).to(acc_t)
        cb = b * 0 if CTX_SHARED else b
        total = Lc + C
        start = s * chunk
        end = tl.minimum(start + chunk, total)
        m_i = tl.full([BLOCK_M], float("-inf"), acc_t)
        l_i = tl.zeros([BLOCK_M], acc_t)
        acc = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
        for n0 in range(start, end, BLOCK_N):
            j = (n0 + rn).to(tl.int64)
            in_range = j < end
            in_ctx = in_range & (j < Lc)
            o = j - Lc
            in_own = in_range & (j >= Lc)
            ok = tl.load(valid_ptr + b * sv_b + o, mask=in_own, other=0) != 0
            keep = in_ctx | (in_own & ok)
            dmask = rd[None, :] < D
            k = tl.load(ck_ptr + cb * sck_b + h * sck_h + j[:, None] * sck_n + rd[None, :],
                        mask=in_ctx[:, None] & dmask, other=0.0).to(acc_t)
            k += tl.load(ok_ptr + b * sok_b + h * sok_h + o[:, None] * sok_n + rd[None, :],
                         mask=(in_own & ok)[:, None] & dmask, other=0.0).to(acc_t)
            v = tl.load(cv_ptr + cb * scv_b + h * scv_h + j[:, None] * scv_n + rd[None, :],
                        mask=in_ctx[:, None] & dmask, other=0.0).to(acc_t)
            v += tl.load(ov_ptr + b * sov_b + h * sov_h + o[:, None] * sov_n + rd[None, :],
                         mask=(in_own & ok)[:, None] & dmask, other=0.0).to(acc_t)
            if F64:  # float64 (the tests' oracle precision): exact products, no tensor-core rounding
                scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            elif IEEE:  # float32 inputs: full float32 products (Triton's default on NVIDIA is TF32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(keep[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if F64:
                pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            elif IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p, v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        base = (bh * SPLITS + s) * BLOCK_M
        tl.store(o_ptr + (base + rm[:, None]) * BLOCK_D + rd[None, :], out)
        tl.store(lse_ptr + base + rm, lse)

    @triton.jit
    def merge(o_ptr, lse_ptr, out_ptr, out_lse_ptr, M, D,
              F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        bh = tl.program_id(0)
        acc_t = tl.float64 if F64 else tl.float32
        rm = tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        top = tl.full([BLOCK_M], float("-inf"), acc_t)
        for s in range(SPLITS):
            top = tl.maximum(top, tl.load(lse_ptr + (bh * SPLITS + s) * BLOCK_M + rm))
        safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros([BLOCK_M], acc_t)
        acc = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
        for s in range(SPLITS):
            base = (bh * SPLITS + s) * BLOCK_M
            w = tl.exp(tl.load(lse_ptr + base + rm) - safe)
            total += w
            acc += w[:, None] * tl.load(o_ptr + (base + rm[:, None]) * BLOCK_D + rd[None, :])
        lse = tl.where(total > 0, safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        keep = (rm[:, None] < M) & (rd[None, :] < D)
        tl.store(out_ptr + (bh * M + rm[:, None]) * D + rd[None, :], out, mask=keep)
        tl.store(out_lse_ptr + bh * M + rm, lse, mask=rm < M)

    _KERNELS.update(partial=partial, merge=merge)
    return partial, merge


def default_splits(batch: int, kv_heads: int, keys: int, sms: int = 132) -> int:
    """Runs per (sequence, KV head): enough programs to fill ``sms`` multiprocessors twice, each run at
    least 256 keys, at most 64 runs."""
    want = max(1, -(-2 * sms // max(1, batch * kv_heads)))
    return max(1, min(64, want, -(-keys // 256)))


def split_kv_decode(q: torch.Tensor, ctx_k, ctx_v, own_k, own_v, own_valid, scale: float,
                    splits: int | None = None, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged attention of ``q`` over ``[context | own valid keys]`` (module docstring); ``out`` in
    ``out_dtype`` (default q's: the accumulation dtype keeps it exact for a merge across hosts)."""
    partial, merge = _kernels()
    triton, _ = _triton()
    batch, heads, rows, dim = q.shape
    ref = ctx_k if ctx_k is not None else own_k
    kv_heads = ref.shape[1]
    group = heads // kv_heads
    m = group * rows
    f64 = q.dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    device = q.device
    lc = 0 if ctx_k is None else ctx_k.shape[2]
    cap = 0 if own_k is None else own_k.shape[2]
    empty = torch.zeros(1, 1, 1, dim, dtype=q.dtype, device=device)
    rows_ok = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731 - any other layout is read in place
    ck, cv = (empty, empty) if ctx_k is None else (rows_ok(ctx_k), rows_ok(ctx_v))
    ok, ov = (empty, empty) if own_k is None else (rows_ok(own_k), rows_ok(own_v))
    if own_k is None:
        valid = torch.zeros(1, 1, dtype=torch.int8, device=device)
    elif own_valid is None:  # every slot holds a key
        valid = torch.ones(batch, cap, dtype=torch.int8, device=device)
    else:
        valid = own_valid.to(torch.int8)
        valid = valid.expand(batch, -1).contiguous() if valid.dim() == 1 else valid.contiguous()
    # the G heads of a KV head and their rows: one tile; scaled here in the accumulation dtype (a scalar
    # argument would reach the kernel as float32)
    qg = (q.to(acc) * scale).reshape(batch, kv_heads, m, dim).contiguous()
    block_m = max(16, triton.next_power_of_2(m))
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = 64 if block_m * block_d <= 64 * 128 else 32
    total = lc + cap
    splits = splits or default_splits(batch, kv_heads, total)
    chunk = max(block_n, -(-max(total, 1) // splits))
    chunk = -(-chunk // block_n) * block_n
    splits = max(1, -(-max(total, 1) // chunk))
    part_o = torch.empty(batch * kv_heads * splits * block_m * block_d, dtype=acc, device=device)
    part_lse = torch.empty(batch * kv_heads * splits * block_m, dtype=acc, device=device)
    shared = ctx_k is not None and ck.shape[0] == 1 and batch > 1
    partial[(batch * kv_heads, splits)](
        qg, ck, cv, ok, ov, valid, part_o, part_lse, kv_heads, m, dim, lc, cap, chunk,
        qg.stride(0), qg.stride(1), qg.stride(2), ck.stride(0), ck.stride(1), ck.stride(2),
        cv.stride(0), cv.stride(1), cv.stride(2), ok.stride(0), ok.stride(1), ok.stride(2),
        ov.stride(0), ov.stride(1), ov.stride(2), valid.stride(0),
        CTX_SHARED=shared, F64=f64, IEEE=q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, SPLITS=splits)
    out = torch.empty(batch, kv_heads, m, dim, dtype=acc, device=device)
    lse = torch.empty(batch, kv_heads, m, dtype=acc, device=device)
    merge[(batch * kv_heads,)](part_o, part_lse, out, lse, m, dim, F64=f64, BLOCK_M=block_m, BLOCK_D=block_d,
                               SPLITS=splits)
    return out.view(batch, heads, rows, dim).to(out_dtype or q.dtype), lse.view(batch, heads, rows)


__all__ = ["default_splits", "split_kv_decode"]
