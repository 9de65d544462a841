"""The terms every training loss of the package sums: ``ce_sum``, the summed cross-entropy of some rows, and
``RankShare``, which turns a rank's local terms and the replicated ones into a loss whose gradients,
summed over the sequence-parallel group, are the gradient of the whole loss.

Shapes: ``logits (B, S, V)``, ``targets (B, S)`` (``IGNORE_INDEX`` = -100 rows ignored); every loss term
is a 0-d tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed.guard import guarded_step, wait

IGNORE_INDEX = -100


class RankShare(torch.autograd.Function):
    """Forward: ``replicated + sum over ranks of (answer + w * context)``, and the loss's two parts, the
    same on every rank (one all-reduce of two numbers). Backward: the replicated term's gradient times
    ``weight`` (1 on one rank, 0 elsewhere), the local terms' as they are."""

    @staticmethod
    def forward(ctx, replicated, answer, context, weight, context_weight, group, timeout_s):
        ctx.weight, ctx.context_weight = weight, context_weight
        local = torch.stack([answer.detach(), context.detach()]).to(replicated.dtype)
        if group is not None:
            with guarded_step("loss", group):
                wait(dist.all_reduce(local, group=group, async_op=True), timeout_s, local)
        answer_total = replicated.detach() + local[0]
        context_total = local[1].clone()
        ctx.mark_non_differentiable(answer_total, context_total)
        return answer_total + context_weight * local[1], answer_total, context_total

    @staticmethod
    def backward(ctx, grad, *unused):
        return grad * ctx.weight, grad, grad * ctx.context_weight, None, None, None, None


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in float32 or better (``logits (B, S, V)``, ``targets (B, S)``, -100 ignored)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX,
                           reduction="sum")
