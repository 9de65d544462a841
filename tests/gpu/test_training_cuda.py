"""``star_sp.training`` on the GPU: every parameter gradient of a training step against the float64
oracle (skipped without CUDA; ``bash tools/run_gpu_tests.sh``).

Bound, per parameter (norm-wise relative error against the float64 oracle): twice the error of the
plain model in the same dtype on the same GPU (the dense ``M_star`` mask through SDPA), flash-attn's
factor for a fused kernel that sums in another order, plus a floor of 4 eps of the dtype for the few
roundings the plain path does not make (the merge of a block's parts, the float32 sums of phase 2).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from model_oracle import _mask, oracle_train
from star_sp import StarConfig
from star_sp.testing import build, exact_norms
from star_sp.training import star_train_loss

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _plain_grads(model, ctx, tgt, labels, block, anchor, weight):
    """The plain model (same dtype, same GPU) under the dense M_star mask: the error a plain
    implementation makes in this precision."""
    ids = torch.cat([ctx, tgt], dim=1).cuda()
    lc, lt = ctx.shape[1], tgt.shape[1]
    mask = _mask(lc, block, anchor, lc + lt, ids.shape[0]).cuda().to(next(model.parameters()).dtype)
    logits = model(ids, attention_mask=mask).logits.float()
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits[:, lc - 1: lc + lt - 1].flatten(0, 1), labels.cuda().flatten(), ignore_index=-100,
                           reduction="sum") / n
    if weight:
        loss = loss + weight * F.cross_entropy(logits[:, : lc - 1].flatten(0, 1), ctx.cuda()[:, 1:].flatten(),
                                               reduction="sum") / (ids.shape[0] * (lc - 1))
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient"])
@pytest.mark.parametrize("lc, lt, block, anchor, weight", [(700, 40, 256, 64, 0.0), (333, 17, 100, 100, 0.5)])
def test_training_step_gradients_on_cuda(dtype, backend, lc, lt, block, anchor, weight):
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("the flash kernel takes 16-bit inputs only")
    model, _ = build("llama", dtype=torch.float64, head_dim=16, num_hidden_layers=2)
    low = copy.deepcopy(model).to(dtype).cuda()  # the same weights, rounded
    exact_norms(model)
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    ctx, tgt = torch.randint(4, vocab, (2, lc), generator=gen), torch.randint(4, vocab, (2, lt), generator=gen)
    labels = tgt.clone()
    labels[:, ::3] = -100
    _, ref = oracle_train(model, ctx, tgt, labels, block, anchor, weight)
    plain = copy.deepcopy(low)
    plain.set_attn_implementation("sdpa")
    plain_grads = _plain_grads(plain, ctx, tgt, labels, block, anchor, weight)
    loss = star_train_loss(low, ctx.cuda(), tgt.cuda(), labels.cuda(), StarConfig(block_size=block, anchor_size=anchor,
                                                                                  backend=backend),
                           context_loss_weight=weight)
    loss.backward()
    eps = torch.finfo(dtype).eps
    for name, p in low.named_parameters():
        bound = 2 * _rel(plain_grads[name], ref[name]) + 4 * eps
        assert _rel(p.grad, ref[name]) <= bound, (name, _rel(p.grad, ref[name]), bound)


def test_many_shapes_prefers_kernels_without_a_per_shape_setup():
    from star_sp.ops.backends import many_shapes, select_kernel

    q = torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 4096, 64, device="cuda", dtype=torch.bfloat16)
    outside = select_kernel("auto", q, k).name
    with many_shapes():
        assert select_kernel("auto", q, k).name == "flash"
        assert select_kernel("cudnn", q, k).name == "cudnn"  # a named backend is used as named
    assert select_kernel("auto", q, k).name == outside
