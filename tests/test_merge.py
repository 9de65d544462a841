"""The LSE merge: attention over key sets merged equals attention over their union."""

import pytest
import torch

from star_sp.ops import attention_with_lse, merge_partials, reference_attention


def _split_points(n, parts, gen):
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: parts - 1].add(1).tolist())
    return list(zip([0] + cuts, cuts + [n]))


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("source", ["reference", "cpu", "math"])
def test_merge_of_parts_equals_union(parts, source):
    gen = torch.Generator().manual_seed(parts)
    q = torch.randn(2, 6, 5, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 3, 17, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 3, 17, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    g_out, g_lse = torch.randn(2, 6, 5, 13, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)

    pieces = []
    for s, e in _split_points(17, parts, gen):
        if source == "reference":
            pieces.append(reference_attention(q, k[:, :, s:e], v[:, :, s:e]))
        else:
            pieces.append(attention_with_lse(q, k[:, :, s:e], v[:, :, s:e], backend=source))
    out, lse = merge_partials(pieces)
    ref_out, ref_lse = reference_attention(q, k, v)
    assert torch.allclose(out, ref_out, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    # gradients through both outputs (the lse gradient exercises the kernels' lse backward)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-11), (a - b).abs().max()


def test_empty_partial_contributes_nothing_and_never_nan():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    full = reference_attention(q, k, v)
    empty = attention_with_lse(q, k[:, :, :0], v[:, :, :0])
    assert torch.isinf(empty[1]).all() and (empty[1] < 0).all() and (empty[0] == 0).all()
    out, lse = merge_partials([empty, full, empty])
    assert torch.allclose(out, full[0]) and torch.allclose(lse, full[1])
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_rows_without_any_keys_give_zero_not_nan():
    empty = (torch.zeros(1, 1, 3, 4, requires_grad=True), torch.full((1, 1, 3), float("-inf"), requires_grad=True))
    out, lse = merge_partials([empty, empty])
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert torch.isfinite(empty[0].grad).all() and torch.isfinite(empty[1].grad).all()


def test_merge_is_stable_for_large_scores():
    out_a, out_b = torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3)
    lse_a, lse_b = torch.tensor([[[1e4, -1e4]]]), torch.tensor([[[1e4, -1e4 + 1]]])
    out, lse = merge_partials([(out_a, lse_a), (out_b, lse_b)])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.allclose(out[0, 0, 0], (out_a + out_b)[0, 0, 0] / 2)


def test_merge_needs_a_partial():
    with pytest.raises(ValueError):
        merge_partials([])


def test_in_place_merge_matches_merge_partials():
    """``merge_into_`` (the forward passes' in-place form): parts merged one by one into a float64
    accumulator equal the union against the oracle, including rows with no keys in some or all parts,
    large scores, and a bf16 partial merged into a float32 accumulator."""
    from star_sp.ops.merge import merge_into_

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 9, dtype=torch.float64, generator=gen) * 30  # large scores
    k = torch.randn(2, 4, 19, 9, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 4, 19, 9, dtype=torch.float64, generator=gen)
    out_acc = torch.zeros(2, 4, 7, 9, dtype=torch.float64)
    lse_acc = torch.full((2, 4, 7), float("-inf"), dtype=torch.float64)
    for s, e in [(0, 0), (0, 5), (5, 5), (5, 12), (12, 19)]:  # empty parts too
        merge_into_(out_acc, lse_acc, *reference_attention(q, k[:, :, s:e], v[:, :, s:e]))
    ref_out, ref_lse = reference_attention(q, k, v)
    assert torch.allclose(out_acc, ref_out, atol=1e-12) and torch.allclose(lse_acc, ref_lse, atol=1e-12)

    # a row with no keys in any part stays O = 0, lse = -inf; a view of a larger accumulator is updated
    big_out, big_lse = torch.zeros(1, 1, 4, 3), torch.full((1, 1, 4), float("-inf"))
    part = (torch.randn(1, 1, 2, 3), torch.tensor([[[0.5, float("-inf")]]]))
    merge_into_(big_out[:, :, 1:3], big_lse[:, :, 1:3], *part)
    merge_into_(big_out[:, :, 1:3], big_lse[:, :, 1:3], torch.zeros(1, 1, 2, 3), torch.full((1, 1, 2), float("-inf")))
    assert torch.equal(big_out[0, 0, 1], part[0][0, 0, 0]) and big_lse[0, 0, 1] == 0.5
    assert (big_out[0, 0, 2] == 0).all() and torch.isneginf(big_lse[0, 0, 2])
    assert (big_out[0, 0, [0, 3]] == 0).all() and torch.isneginf(big_lse[0, 0, [0, 3]]).all()

    # low-precision partials into a float32 accumulator: as merge_partials does it
    a = (torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 5))
    b = (torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 5))
    want_out, want_lse = merge_partials([(a[0].float(), a[1]), (b[0].float(), b[1])])
    acc_out, acc_lse = a[0].float(), a[1].clone()
    merge_into_(acc_out, acc_lse, *b)
    assert torch.allclose(acc_out, want_out, atol=1e-6) and torch.allclose(acc_lse, want_lse, atol=1e-6)


def test_coverage_and_output_buffers():
    """How many parts share a row and whether all rows have one decide the forward's accumulator:
    q's dtype without merges (or with at most two merged parts per row and the fused GPU merge), float32
    otherwise; uninitialised only when every row is written exactly once; always in q's memory layout."""
    from star_sp.ops.parts import coverage, output_buffers

    spans = lambda *s: [(a, b) for a, b in s]  # noqa: E731
    assert coverage(spans((0, 4), (4, 11)), 11) == (1, True)
    assert coverage(spans((0, 4), (4, 11), (4, 11)), 11) == (2, True)
    assert coverage(spans((0, 11), (0, 5), (3, 8)), 11) == (3, True)
    assert coverage(spans((0, 4), (5, 11)), 11) == (1, False)  # row 4 has no part
    assert coverage(spans((2, 11)), 11) == (1, False)
    assert coverage(spans((0, 10)), 11) == (1, False)
    assert coverage(spans((5, 9), (0, 6), (8, 11)), 11) == (2, True)  # out of order
    assert coverage([], 3) == (0, False)

    q = torch.randn(2, 7, 3, 4, dtype=torch.bfloat16).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    two = spans((0, 7), (2, 7))
    for part_rows, fused, dtype, zeroed in [(spans((0, 3), (3, 7)), False, torch.bfloat16, False),
                                        (two, False, torch.float32, True), (two, True, torch.bfloat16, True),
                                        (two + spans((4, 6)), True, torch.float32, True),
                                        (spans((1, 7)), False, torch.bfloat16, True)]:
        out, lse = output_buffers(q, part_rows, fused)
        like_q = torch.empty_like(q, dtype=dtype).stride()
        assert out.dtype == dtype and out.stride() == like_q != out.contiguous().stride()
        assert lse.dtype == torch.float32 and lse.shape == (2, 3, 7) and torch.isneginf(lse).all()
        if zeroed:
            assert (out == 0).all()


def test_partly_overlapping_parts_never_read_garbage():
    """Parts that overlap in part (rows 0-5 and 4-9): the second merges into rows only it covers, which
    must start as zeros, not uninitialised memory. Checked against the oracle, repeatedly (garbage is
    not deterministic)."""
    from star_sp.ops import KERNELS, Part, parts_attention

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 10, 8, generator=gen)
    k, v = torch.randn(1, 2, 10, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    parts = [Part(0, 6, k[:, :, :4], v[:, :, :4]), Part(4, 10, k[:, :, 4:], v[:, :, 4:])]
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:6, :4] = True
    mask[4:, 4:] = True
    ref, _ = reference_attention(q, k, v, mask)
    for _ in range(20):
        out, _ = parts_attention(q, parts, KERNELS["math"], 8 ** -0.5)
        assert torch.allclose(out.double(), ref, atol=1e-5)
