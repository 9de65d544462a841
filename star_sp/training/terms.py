"""The terms every training loss of the package sums: ``ce_sum``, the summed cross-entropy of some rows, and
``RankShare``, which turns a rank's local terms and the replicated ones into a loss whose gradients,
summed over the sequence-parallel group, are the gradient of the whole loss; ``HeadRows``, the rows a loss
reads, whose logits it computes a chunk at a time.

Shapes: ``logits (B, S, V)``, ``targets (B, S)`` (``IGNORE_INDEX`` = -100 rows ignored); every loss term
is a 0-d tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


class HeadRows:
    """The rows a loss reads, as their final hidden states and the projection to the vocabulary, so that
    the loss materialises logits a chunk of rows at a time: each chunk's logits are computed, turned into
    its rows' cross-entropy and dropped, and recomputed in the backward pass (at 128K rows and a 128K
    vocabulary all of them would take 64 GB in float32).

    ``hidden (B, R, H)``; ``project(h (B, r, H)) -> logits (B, r, V)``, or None when ``hidden`` already
    holds the logits ``(B, R, V)`` (a model whose head does more than a projection)."""

    def __init__(self, hidden: torch.Tensor, project=None):
        self.hidden, self.project = hidden, project

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[1]

    def row_losses(self, targets: torch.Tensor, calls: int) -> torch.Tensor:
        """Each row's cross-entropy against ``targets (B, R)`` (0 where ``IGNORE_INDEX``), ``(B, R)`` in float32
        or better, from exactly ``calls`` calls of the head, the last ones over no rows where there are
        fewer rows than calls: every rank of a group that passes the same ``calls`` runs the head's module as
        often as the others (ZeRO-3 gathers its parameters at each call, forward and backward)."""
        if self.project is None:
            return self._chunk(self.hidden, targets)
        step = max(1, -(-self.num_rows // calls))
        parts = []
        for i in range(calls):
            h, t = self.hidden[:, i * step:(i + 1) * step], targets[:, i * step:(i + 1) * step]
            if torch.is_grad_enabled() and calls > 1:
                parts.append(checkpoint(self._chunk, h, t, use_reentrant=False))
            else:
                parts.append(self._chunk(h, t))
        return torch.cat(parts, dim=1)

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden if self.project is None else self.project(hidden)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX,
                               reduction="none").view(targets.shape)


def head_calls(rows_bound: int, chunk_tokens: int) -> int:
    """The head calls of a loss over at most ``rows_bound`` rows, ``chunk_tokens`` rows a call (0: one call);
    a bound every rank of a group computes alike."""
    return max(1, -(-rows_bound // chunk_tokens)) if chunk_tokens else 1
