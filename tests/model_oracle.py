"""The model-level oracle: the same weights run once over ``[context ; query ; generated]`` in float64
with the dense ``M_star`` mask (``docs/design.md``, section 2)."""

from __future__ import annotations

import copy

import torch

from star_sp.ops import star_mask

# The models' RMSNorm computes in float32 even for float64 weights, so two float64 runs that differ
# only in attention rounding (1e-16) can differ by float32 rounding after a norm: this is the floor.
LOGIT_ATOL = 1e-6


def reference_model(model):
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("sdpa")
    return ref


def _mask(context_len, block, anchor, total, batch, device=None):
    keep = star_mask(context_len, block, anchor, total - context_len, device=device)
    add = torch.zeros(total, total, dtype=torch.float64, device=device).masked_fill(~keep, float("-inf"))
    return add[None, None].expand(batch, 1, total, total)


@torch.no_grad()
def oracle_logits(ref, context_ids, query_ids, block, anchor):
    ids = torch.cat([context_ids, query_ids], dim=1)
    lc = context_ids.shape[1]
    out = ref(ids, attention_mask=_mask(lc, block, anchor, ids.shape[1], ids.shape[0], ids.device))
    return out.logits[:, lc:]


@torch.no_grad()
def oracle_greedy(ref, context_ids, query_ids, block, anchor, steps):
    ids = torch.cat([context_ids, query_ids], dim=1)
    lc = context_ids.shape[1]
    for _ in range(steps):
        logits = ref(ids, attention_mask=_mask(lc, block, anchor, ids.shape[1], ids.shape[0], ids.device)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, lc + query_ids.shape[1]:]


def oracle_train(model, context_ids, target_ids, labels, block, anchor, context_loss_weight):
    """The training loss of ``star_sp.training.star_train_loss`` for the plain model in float64 under
    the dense ``M_star`` mask over ``[context ; target]``, and every parameter's gradient by name."""
    import torch.nn.functional as F

    ref = reference_model(model)
    ids = torch.cat([context_ids, target_ids], dim=1)
    lc, lt = context_ids.shape[1], target_ids.shape[1]
    logits = ref(ids, attention_mask=_mask(lc, block, anchor, lc + lt, ids.shape[0], ids.device)).logits
    n = (labels != -100).sum()
    loss = F.cross_entropy(logits[:, lc - 1: lc + lt - 1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n.clamp_min(1)
    if context_loss_weight:
        loss = loss + context_loss_weight * F.cross_entropy(
            logits[:, : lc - 1].flatten(0, 1), context_ids[:, 1:].flatten(), reduction="sum") / (ids.shape[0] * (lc - 1))
    names = [name for name, _ in ref.named_parameters()]
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, list(ref.parameters()))))
