"""Inputs, the oracle's gradients and data-derived tolerances shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from star_sp.ops import reference_attention, star_mask


@dataclass(frozen=True)
class Case:
    """One Star Attention layer over ``[context ; query]``."""

    context_len: int
    query_len: int
    block_size: int
    anchor_size: int
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 59
    dtype: torch.dtype = torch.float64
    anchor_source: str = "broadcast"
    merge: str = "allreduce"
    backend: str = "auto"
    seed: int = 0

    @property
    def total(self) -> int:
        return self.context_len + self.query_len

    def but(self, **kw) -> "Case":
        return replace(self, **kw)


def make_qkv(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``q, k, v`` over all tokens and an upstream gradient ``g`` for the output."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = lambda h: (case.batch, h, case.total, case.head_dim)  # noqa: E731
    q = torch.randn(shape(case.heads), generator=gen, dtype=torch.float64)
    k = torch.randn(shape(case.kv_heads), generator=gen, dtype=torch.float64)
    v = torch.randn(shape(case.kv_heads), generator=gen, dtype=torch.float64)
    g = torch.randn(shape(case.heads), generator=gen, dtype=torch.float64)
    return q, k, v, g


def oracle(case: Case, q, k, v, g):
    """Float64 dense ``M_star`` attention, its log-sum-exp, and gradients of ``sum(out * g)``."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = star_mask(case.context_len, case.block_size, case.anchor_size, case.query_len)
    out, lse = reference_attention(q, k, v, mask)
    dq, dk, dv = torch.autograd.grad((out * g.double()).sum(), (q, k, v))
    return out.detach(), lse.detach(), (dq, dk, dv)


def plain_lowp(case: Case, q, k, v, g):
    """The plain implementation in ``case.dtype``: dense masked attention with scores and products in
    that dtype and the softmax in float32. Its error against the oracle sets the tolerance."""
    q, k, v = (t.detach().to(case.dtype).requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = star_mask(case.context_len, case.block_size, case.anchor_size, case.query_len)
    s = (q @ ke.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).to(case.dtype)
    out = p @ ve
    grads = torch.autograd.grad((out * g.to(case.dtype)).sum(), (q, k, v))
    return out.detach(), grads


def merge_inputs(world: int, seed: int = 0):
    """Float64 ``q (2, 3, 6, 16), k, v (2, 3, K, 16)``, a key mask ``(6, K)`` (True = attend) and each
    rank's span of the keys, for merge tests over ``world`` ranks: the spans have different lengths, the
    scores are spread (q scaled by 4: the ranks' log-sum-exps differ by several units), row ``r % 5``
    has no key on rank ``r`` and row 5 none on any rank."""
    gen = torch.Generator().manual_seed(100 + seed)
    lengths = [5 + 2 * r for r in range(world)]
    starts = [sum(lengths[:r]) for r in range(world)]
    spans = [(s, s + n) for s, n in zip(starts, lengths)]
    keys = sum(lengths)
    q = torch.randn(2, 3, 6, 16, generator=gen, dtype=torch.float64) * 4
    k = torch.randn(2, 3, keys, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, keys, 16, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, keys, generator=gen) < 0.7
    for r, (s, e) in enumerate(spans):
        mask[r % 5, s:e] = False
    mask[5] = False
    return q, k, v, mask, spans


def plain_attention_lse(q, k, v, mask, dtype):
    """The plain implementation in ``dtype`` with its log-sum-exp: dense attention under ``mask`` (True =
    attend), products in ``dtype``, softmax and log-sum-exp in float32 (float64 for float64), the output
    in ``dtype``; a row without keys gives ``out = 0``, ``lse = -inf`` (a kernel's partial result)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    s = q @ k.transpose(-1, -2)
    s = (s if dtype == torch.float64 else s.float()) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(dtype)  # a row without keys: 0, not NaN
    return p @ v, torch.logsumexp(s, dim=-1)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def oracle_bound(ref: torch.Tensor, plain: torch.Tensor | None, dtype: torch.dtype) -> float:
    """How far a result may be from the float64 oracle ``ref`` (docs/design.md, section 4). float64:
    1e-10 of the data's scale. Lower precision: twice the error of ``plain`` (the plain implementation of
    the same math in ``dtype``) against the oracle, flash-attn's factor, plus a floor of 4 eps of
    ``dtype`` at the data's scale (the roundings a fast path may add to the plain one's)."""
    scale = max(1.0, ref.abs().max().item())
    if dtype == torch.float64:
        return 1e-10 * scale
    assert plain is not None
    return 2 * max_err(plain, ref) + 4 * torch.finfo(dtype).eps * scale


def assert_close_to_oracle(name: str, got: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor | None,
                           dtype: torch.dtype) -> float:
    """``got`` within ``oracle_bound`` of the float64 oracle ``ref``. Returns the error seen."""
    err = max_err(got, ref)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    bound = oracle_bound(ref, plain, dtype)
    assert err <= bound, f"{name}: error {err:.3g} against the float64 oracle exceeds {bound:.3g}"
    return err


def assert_bound_not_vacuous(name: str, wrong: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor | None,
                             dtype: torch.dtype) -> None:
    """``wrong`` (what a named bug would give, e.g. a merge that drops one rank's keys) must lie outside
    ``oracle_bound``: a bound that lets it pass could not catch that bug."""
    err, bound = max_err(wrong, ref), oracle_bound(ref, plain, dtype)
    assert err > bound, f"{name}: the bound {bound:.3g} is vacuous: a wrong result within {err:.3g} passes it"


@torch.no_grad()
def plain_model_logits(model, context_ids: torch.Tensor, query_ids: torch.Tensor, block: int, anchor: int):
    """The plain implementation at model level: ``model`` as it is (its dtype and device, SDPA attention)
    run once over ``[context ; query]`` with the dense ``M_star`` mask; logits of the query positions.
    Its error against ``model_oracle.oracle_logits`` sets the tolerance of a whole model in that dtype."""
    import copy

    plain = copy.deepcopy(model)
    plain.set_attn_implementation("sdpa")
    ids = torch.cat([context_ids, query_ids], dim=1)
    lc, total = context_ids.shape[1], ids.shape[1]
    dtype = next(plain.parameters()).dtype
    keep = star_mask(lc, block, anchor, total - lc, device=ids.device)
    mask = torch.zeros(total, total, dtype=dtype, device=ids.device).masked_fill(~keep, float("-inf"))
    return plain(ids, attention_mask=mask[None, None].expand(ids.shape[0], 1, total, total)).logits[:, lc:]


def plain_attention(q, k, v, mask, device, dtype):
    """The plain implementation in ``dtype`` on ``device``: dense attention under ``mask`` (True =
    attend), products in ``dtype``, softmax in float32."""
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask.to(device), float("-inf")), dim=-1).to(dtype) @ v


def check_phase1_alignment(device, backend, dtype):
    """What ``tests/gpu/test_cuda.py::test_phase1_causal_alignment`` checks, on any device: the probe's
    answer (``Kernel.bottom_right_causal``) is what ``backend`` does with more keys than rows; phase 1's
    split form matches the oracle; the fused form is chosen and exact exactly where the alignment is
    bottom-right, refused with one clear error elsewhere. On CPU the ``cpu`` (top-left) and ``math``
    (bottom-right) kernels take both branches (``test_star_local.py``)."""
    import pytest

    from star_sp import StarInputError
    from star_sp.ops import KERNELS, local_attention, phase1_parts
    from star_sp.ops.star import can_fuse_anchor

    kernel = KERNELS[backend]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 128, generator=gen, dtype=torch.float64) for h in (8, 2, 2))
    xs = [t.to(device, dtype) for t in (q, k, v)]
    assert kernel.unsupported(xs[0], xs[1]) is None, kernel.unsupported(xs[0], xs[1])
    eps = torch.finfo(dtype).eps
    aligned = kernel.bottom_right_causal(xs[0].device, dtype)

    # the probe's answer is what the kernel does with 64 rows over 160 keys under causal=True
    rows, keys, scale = 64, 160, 128 ** -0.5
    masks = {"bottom-right": torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows),
             "top-left": torch.ones(rows, keys, dtype=torch.bool).tril()}
    args = (q[:, :, :rows], k[:, :, :keys], v[:, :, :keys])
    try:
        got = kernel.forward(xs[0][:, :, :rows], xs[1][:, :, :keys], xs[2][:, :, :keys], True, scale)[0]
    except RuntimeError:
        got = None  # refused: the probe must have said top-left
    within = {}
    for name, mask in masks.items():
        ref = reference_attention(*args, mask, scale)[0]
        bound = 2 * max_err(plain_attention(*args, mask, device, dtype), ref) + 4 * eps
        within[name] = got is not None and max_err(got, ref) <= bound
    assert within["bottom-right"] == aligned, f"{backend}: the probe says bottom-right {aligned}, the kernel differs"
    if got is not None and not aligned:
        assert within["top-left"], f"{backend} aligns a rectangular causal mask neither way"

    # phase 1: the split form always, the fused form exactly where the kernel aligns bottom-right
    lengths, anchor = [64, 64, 64, 64, 44], 32
    mask = star_mask(300, 64, anchor)
    ref = reference_attention(q, k, v, mask)[0]
    bound = 2 * max_err(plain_attention(q, k, v, mask, device, dtype), ref) + 4 * eps
    with torch.no_grad():
        assert can_fuse_anchor(*xs, backend) == aligned
        split, _ = local_attention(xs[0], phase1_parts(xs[1], xs[2], lengths, has_block0=True, anchor_len=anchor),
                                   scale=None, backend=backend)
        assert max_err(split, ref) <= bound
        fused_parts = phase1_parts(xs[1], xs[2], lengths, has_block0=True, anchor_len=anchor, fuse_anchor=True)
        if aligned:
            fused, _ = local_attention(xs[0], fused_parts, scale=None, backend=backend)
            assert max_err(fused, ref) <= bound
        else:
            with pytest.raises(StarInputError, match="does not align a causal mask bottom-right"):
                local_attention(xs[0], fused_parts, scale=None, backend=backend)
