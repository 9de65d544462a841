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


def rank_partial(rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's partial attention result ``(out (2, 3, 5, 4), lse (2, 3, 5))`` for merge tests, from a
    seed per rank: row 4 has no keys on any rank, row ``rank % 4`` none on this rank (there ``out = 0``)."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = torch.randn(2, 3, 5, 4, generator=gen).to(dtype)
    lse = torch.randn(2, 3, 5, generator=gen) * 20
    lse[:, :, 4] = float("-inf")
    lse[:, :, rank % 4] = float("-inf")
    out[lse == float("-inf")] = 0
    return out, lse


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_oracle(name: str, got: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor | None,
                           dtype: torch.dtype) -> float:
    """float64: within 1e-10. Lower precision: at most 2x the plain implementation's error (plus a
    floor of a few ulps at the data's scale). Returns the error seen."""
    err = max_err(got, ref)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if dtype == torch.float64:
        bound = 1e-10 * max(1.0, ref.abs().max().item())
    else:
        assert plain is not None
        eps = torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
        bound = 2 * max_err(plain, ref) + 4 * eps
    assert err <= bound, f"{name}: error {err:.3g} against the float64 oracle exceeds {bound:.3g}"
    return err


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
