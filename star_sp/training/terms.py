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
    the loss materialises logits ``chunk_tokens`` rows at a time: each chunk's logits are computed, turned
    into its cross-entropy and dropped, and recomputed in the backward pass (at 128K rows and a 128K
    vocabulary all of them would take 64 GB in float32).

    ``hidden (B, R, H)``; ``project(h (B, r, H)) -> logits (B, r, V)``, or None when ``hidden`` already
    holds the logits ``(B, R, V)`` (a model whose head does more than a projection); ``chunk_tokens``
    0: all rows at once."""

    def __init__(self, hidden: torch.Tensor, project=None, chunk_tokens: int = 0):
        self.hidden, self.project, self.chunk_tokens = hidden, project, chunk_tokens

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[1]

    @property
    def real(self) -> torch.dtype:
        """The dtype loss terms are summed in: float64 for float64 models, else float32."""
        return torch.float64 if self.hidden.dtype == torch.float64 else torch.float32

    def narrow(self, start: int, length: int) -> "HeadRows":
        return HeadRows(self.hidden[:, start:start + length], self.project, self.chunk_tokens)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.project is None else self.project(hidden)

    def ce_sum(self, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of the rows against ``targets (B, R)`` (``ce_sum``), chunk by chunk."""
        step = self.chunk_tokens or self.num_rows
        if self.project is None or step >= self.num_rows:
            return ce_sum(self._logits(self.hidden), targets)
        total = torch.zeros((), dtype=self.real, device=self.hidden.device)
        for start in range(0, self.num_rows, step):
            h, t = self.hidden[:, start:start + step], targets[:, start:start + step]
            if torch.is_grad_enabled():
                part = checkpoint(self._chunk, h, t, use_reentrant=False)
            else:
                part = self._chunk(h, t)
            total = total + part
        return total

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ce_sum(self._logits(hidden), targets)

    def zero(self) -> torch.Tensor:
        """0 x every row and one row's logits: the rows and the head join the backward on a rank whose rows
        own no loss term (every rank then runs the same modules, as ZeRO-3's parameter gathering needs)."""
        if self.project is None:
            return 0 * self.hidden.sum().to(self.real)
        return 0 * (self.hidden.sum().to(self.real) + self._logits(self.hidden[:, :1]).sum().to(self.real))
