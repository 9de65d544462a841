"""attention_with_lse on each CPU backend against the float64 oracle, forward and backward."""

import pytest
import torch

from star_sp import BackendUnavailableError, StarInputError
from star_sp.ops import attention_with_lse, reference_attention
from common import max_err


def _inputs(sq, sk, h=6, hkv=2, d=59, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, sq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, hkv, sk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, hkv, sk, d, generator=gen, dtype=torch.float64)
    return q, k, v, torch.randn(2, h, sq, d, generator=gen, dtype=torch.float64)


def _bottom_right(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)


def _run(fn, q, k, v, g, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), (q, k, v))
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("sq, sk, causal", [(1, 1, True), (7, 7, True), (5, 23, True), (1, 23, True), (33, 33, False),
                                            (3, 40, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_attention_with_lse_matches_oracle(backend, sq, sk, causal, dtype):
    q, k, v, g = _inputs(sq, sk)
    mask = _bottom_right(sq, sk) if causal else None
    ref_out, ref_lse, ref_grads = _run(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v, g, torch.float64)
    out, lse, grads = _run(lambda q, k, v: attention_with_lse(q, k, v, causal=causal, backend=backend), q, k, v, g, dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    if dtype == torch.float64:
        tol_out = tol_lse = tol_grad = 1e-10
    else:
        # the plain implementation in this dtype (the math backend) bounds what is acceptable
        p_out, p_lse, p_grads = _run(lambda q, k, v: attention_with_lse(q, k, v, causal=causal, backend="math"),
                                     q, k, v, g, dtype)
        eps = torch.finfo(dtype).eps
        tol_out = 2 * max_err(p_out, ref_out) + 4 * eps
        tol_lse = 2 * max_err(p_lse, ref_lse) + 16 * eps
        tol_grad = max(2 * max_err(a, b) + 8 * eps * b.abs().max().item() for a, b in zip(p_grads, ref_grads))
    assert max_err(out, ref_out) <= tol_out
    assert max_err(lse, ref_lse) <= tol_lse
    for a, b in zip(grads, ref_grads):
        assert max_err(a, b) <= tol_grad


def test_low_precision_tolerance_is_not_vacuous():
    """The bf16 bound must be far below the size of a real mistake (a dropped key)."""
    q, k, v, _ = _inputs(5, 23)
    ref = reference_attention(q, k, v)[0]
    plain = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="math")[0]
    wrong = reference_attention(q, k[:, :, 1:], v[:, :, 1:])[0]
    assert 2 * max_err(plain, ref) < 0.25 * max_err(wrong, ref)


def test_explicit_backend_never_falls_back():
    q, k, v, _ = _inputs(4, 4)
    for name in ("flash", "cudnn", "efficient"):
        with pytest.raises(BackendUnavailableError, match=f"backend '{name}' cannot run"):
            attention_with_lse(q.float(), k.float(), v.float(), backend=name)
    with pytest.raises(StarInputError, match="unknown attention backend"):
        attention_with_lse(q, k, v, backend="triton")


@pytest.mark.parametrize("bad, words", [
    (lambda q, k, v: (q[0], k, v), "must be 4-D"),
    (lambda q, k, v: (q, k, v[:, :, :-1]), "one shape"),
    (lambda q, k, v: (q, k.float(), v.float()), "one dtype"),
    (lambda q, k, v: (q[:, :5], k, v), "multiple of KV heads"),
    (lambda q, k, v: (q[..., :-1], k, v), "head_dim"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), "floating point"),
])
def test_bad_inputs_raise_clear_errors(bad, words):
    q, k, v, _ = _inputs(4, 4)
    with pytest.raises(StarInputError, match=words):
        attention_with_lse(*bad(q, k, v))


def test_causal_needs_enough_keys():
    q, k, v, _ = _inputs(5, 3)
    with pytest.raises(ValueError, match="at least as many keys"):
        attention_with_lse(q, k, v, causal=True)


@pytest.mark.parametrize("b, h, hkv, sq, cap, filled", [(2, 6, 2, 1, 13, 5), (1, 4, 4, 3, 7, 7), (3, 8, 1, 1, 9, 1)])
def test_valid_keys_attention_matches_oracle(b, h, hkv, sq, cap, filled):
    """A decode step's attention over a fixed buffer with a device-side fill level (``ops.valid_keys``)
    equals the oracle over the filled keys alone; GQA; unfilled slots hold garbage that must not leak;
    a buffer with no valid key gives 0 and -inf."""
    from star_sp.ops.valid_keys import valid_keys_attention

    gen = torch.Generator().manual_seed(cap)
    q = torch.randn(b, h, sq, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(b, hkv, cap, 16, dtype=torch.float64, generator=gen)
    v = torch.randn(b, hkv, cap, 16, dtype=torch.float64, generator=gen)
    k[:, :, filled:], v[:, :, filled:] = 1e4, float("nan")  # garbage beyond the fill level
    valid = torch.arange(cap) < torch.tensor(filled)
    out, lse = valid_keys_attention(q, k, v, valid, 0.3)
    ref_out, ref_lse = reference_attention(q, k[:, :, :filled], v[:, :, :filled], scale=0.3)
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    low, low_lse = valid_keys_attention(q.float(), k.float(), v.float(), valid, 0.3)
    assert low.dtype == torch.float32 and torch.allclose(low.double(), ref_out, atol=1e-5)
    none, none_lse = valid_keys_attention(q, k, v.nan_to_num(0.0), torch.zeros(cap, dtype=torch.bool), 0.3)
    assert (none == 0).all() and torch.isneginf(none_lse).all()


@pytest.mark.parametrize("keep", ["none", "causal", "valid", "empty row"])
def test_softmax_lse_matches_oracle(keep):
    """``ops.softmax.softmax_lse``, the one plain softmax (the math kernel's and the decode buffer's):
    with no mask, a bottom-right causal mask, a key mask, and a row without keys (p = 0, lse = -inf,
    never NaN); GQA heads; recomputing p from a given lse gives the same p."""
    from star_sp.ops.softmax import group_heads, softmax_lse

    q, k, v, _ = _inputs(4, 9)
    masks = {"none": None, "causal": _bottom_right(4, 9), "valid": torch.arange(9) % 3 != 1,
             "empty row": torch.ones(4, 9, dtype=torch.bool).index_fill_(0, torch.tensor([2]), False)}
    mask = masks[keep]
    p, lse = softmax_lse(q, k, 0.3, mask)
    out = torch.matmul(group_heads(p, k.shape[1]), v).view(q.shape)
    ref_out, ref_lse = reference_attention(q, k, v, None if mask is None else mask.expand(4, 9), scale=0.3)
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.allclose(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)], atol=1e-12)
    assert torch.isfinite(p).all() and (p[:, :, 2] == 0).all() == (keep == "empty row")
    again, _ = softmax_lse(q, k, 0.3, mask, lse)
    assert torch.equal(again, p)


def test_cudnn_only_where_its_row_tiles_fill_the_gpu():
    """cuDNN does not split the keys: a call with fewer 128-row tiles than SMs (decode questions folded
    into rows over a long context) or with decode-sized rows goes to flash."""
    from star_sp.ops.backends import cudnn_fills

    assert cudnn_fills(1, 32, 16384, 132)          # a 16K prefill block: 4096 tiles
    assert not cudnn_fills(1, 8, 128, 132)         # 32 questions x 4 heads per KV head: 8 tiles
    assert not cudnn_fills(64, 32, 16, 132)        # short rows: decode-sized, whatever the tile count
    assert cudnn_fills(1, 8, 129 * 16, 132) and not cudnn_fills(1, 8, 128 * 16, 132)  # 136 vs 128 tiles
