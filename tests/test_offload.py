"""``runtime/offload.py``: what activation checkpointing keeps, in host memory (CPU: the same code path,
unpinned). The copies are byte for byte, so gradients equal those without offload exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from star_sp.runtime.offload import HOST_POOL, ActivationOffload, activation_offload, offload_error, size_class


def _layer(x, table, w):
    return torch.tanh(x @ w + table)


def _step(x, table, weights, offload):
    """Checkpointed layers over ``x``, each taking ``table`` too (as each decoder layer takes RoPE's table)."""
    for i, w in enumerate(weights):
        with offload.for_checkpoint(i) if offload is not None else torch.enable_grad():
            x = checkpoint(_layer, x, table, w, use_reentrant=False)
    if offload is not None:
        offload.done()
    x.square().sum().backward()
    return [w.grad.clone() for w in weights]


def _inputs(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(rows, 64, generator=gen, dtype=torch.float64)
    weights = [torch.randn(64, 64, generator=gen, dtype=torch.float64).div(8).requires_grad_() for _ in range(3)]
    return x, table, weights


@pytest.mark.parametrize("layers", [None, 2])
def test_offloaded_checkpoints_give_the_same_gradients_and_copy_a_shared_tensor_once(layers):
    x, table, weights = _inputs(300)
    plain = _step(x, table, weights, None)
    for w in weights:
        w.grad = None
    offload = ActivationOffload(layers, min_bytes=0)
    got = _step(x, table, weights, offload)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    hooked = 3 if layers is None else layers
    assert offload.offloaded_checkpoints == list(range(hooked))
    row, weight = 300 * 64 * 8, 64 * 64 * 8  # each hooked layer's input x and weight, the shared table once
    assert offload.offloaded_bytes == (hooked + 1) * row + hooked * weight, offload.offloaded_bytes


def test_a_tensor_changed_in_place_is_copied_again():
    offload = ActivationOffload(min_bytes=0)
    t = torch.ones(1000)
    first = offload._pack(t)
    assert offload._pack(t) is first
    t.add_(1)  # a new version: the earlier copy is no longer this tensor
    second = offload._pack(t)
    assert second is not first and torch.equal(offload._unpack(second), t) and offload._unpack(first).eq(1).all()


def test_the_pool_serves_later_steps_and_follows_their_sizes():
    """A second step of the same shapes allocates no buffer; steps of nearby sizes share size classes; a
    forward releases what it did not take, so the pool does not grow with the sizes seen."""
    HOST_POOL.trim()
    x, table, weights = _inputs(300)
    _step(x, table, weights, ActivationOffload(min_bytes=0))
    before = HOST_POOL.allocations
    for w in weights:
        w.grad = None
    _step(x, table, weights, ActivationOffload(min_bytes=0))
    assert HOST_POOL.allocations == before
    for rows in range(301, 319, 4):  # nearby sizes: the same size classes as 300 rows
        x, table, weights = _inputs(rows)
        _step(x, table, weights, ActivationOffload(min_bytes=0))
    assert HOST_POOL.allocations == before
    for rows in (600, 1200, 2400):  # growing sizes: each forward releases the earlier buffers
        x, table, weights = _inputs(rows)
        _step(x, table, weights, ActivationOffload(min_bytes=0))
        pooled = sum(b.numel() for free in HOST_POOL._free.values() for b in free)  # after its backward
        assert pooled == 4 * size_class(rows * 64 * 8) + 3 * size_class(64 * 64 * 8), (rows, pooled)


def test_size_classes_waste_at_most_an_eighth():
    for n in (1, 4096, 4097, 10**6, 2_500_000_123, 3 * 2**30 + 5):
        c = size_class(n)
        assert n <= c <= max(4096, n * 1.125), (n, c)


def test_the_losses_argument_gives_the_offload():
    assert activation_offload(True).layers is None and activation_offload(5).layers == 5
    assert activation_offload(False) is None and activation_offload(0) is None
    assert offload_error(True) is None and offload_error(3) is None
    for bad in (-1, 2.5, "all"):
        assert offload_error(bad).startswith("offload_activations must be True, False or a whole number of layers")
