"""What one rank computes for one sample: the loss under the anchor pattern, or under global attention
(the control), as a module that a DeepSpeed engine or a plain optimizer can drive.

Both give each rank a *share* of the loss whose gradients, summed over the sequence-parallel group,
are the gradient of the loss (``star_train_loss``'s contract), and the loss's value, the same on every
rank of the group.
"""

from __future__ import annotations

import contextlib

import torch

from ... import _compat
from ...config import StarConfig
from ...ops.backends import many_shapes
from ...runtime.offload import activation_offload
from ...training.loss import star_train_loss
from ...training.terms import IGNORE_INDEX, ce_sum


def global_train_loss(model, context_ids: torch.Tensor, target_ids: torch.Tensor, labels: torch.Tensor, *,
                      context_loss_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``star_train_loss``'s loss for the plain model (a causal mask over ``[context ; target]``):
    ``(loss, answer part, context part or None)``, ``loss = answer + w * context``.

    The answer part is the mean cross-entropy of the labelled target tokens (``labels[:, t]`` predicted
    from the position before target token ``t``); the context part the mean loss of context token
    ``i + 1`` predicted from position ``i``.
    """
    ids = torch.cat([context_ids, target_ids], dim=1)
    lc, lt = context_ids.shape[1], target_ids.shape[1]
    device = next(model.parameters()).device
    if context_loss_weight:
        logits = model(input_ids=ids.to(device)).logits
        answer_logits = logits[:, lc - 1: lc + lt - 1]
    else:  # the last lt + 1 positions: lc - 1 .. lc + lt - 1, the last one predicts nothing
        answer_logits = model(input_ids=ids.to(device), logits_to_keep=lt + 1).logits[:, :-1]
    n_labelled = int((labels != IGNORE_INDEX).sum())
    answer = ce_sum(answer_logits, labels) / max(1, n_labelled)
    if not context_loss_weight:
        return answer, answer.detach(), None
    context = ce_sum(logits[:, : lc - 1], context_ids[:, 1:]) / (ids.shape[0] * (lc - 1))
    return answer + context_loss_weight * context, answer.detach(), context.detach()


class TrainModule(torch.nn.Module):
    """``forward(sample)`` -> ``(share, info)``: this rank's share of the sample's loss (to
    backpropagate) and ``info`` (floats: ``loss``, ``answer_loss`` and ``context_loss``, None when
    ``context_loss_weight`` is 0; the same on every rank of the group).

    ``attention="star"``: ``star_train_loss`` over the group ``sp``. ``"global"``: every rank of the
    group runs the plain model on the same sample; the group's first rank carries the whole loss and
    the others a zero share, so the gradients summed over the group are the loss's gradient, as for
    star, and every step after it (DeepSpeed's scaling, the sums and averages) is the same.

    Both run under ``many_shapes()``: every sample has its own length and block sizes, so the attention
    kernels are the ones without a per-shape setup cost (``backend='auto'``; a named backend is used as
    named).

    Star's parts come with its loss (``return_parts``: one all-reduce of two numbers it makes anyway),
    so every step has them at no extra cost.
    """

    def __init__(self, model, *, attention: str, sp, sp_rank: int, context_loss_weight: float,
                 anchor_source: str = "broadcast", backend: str = "auto", collective_timeout_s: float = 600.0,
                 offload_activations: bool | int = False, loss_chunk_tokens: int = 4096, tiled_mlp: int = 0):
        super().__init__()
        self.model = model
        self.attention, self.sp, self.sp_rank, self.weight = attention, sp, sp_rank, context_loss_weight
        self.star = dict(anchor_source=anchor_source, backend=backend, collective_timeout_s=collective_timeout_s)
        self.memory = dict(offload_activations=offload_activations, loss_chunk_tokens=loss_chunk_tokens,
                           tiled_mlp=tiled_mlp)

    def _offloading(self):
        """The plain model's checkpoints keep their inputs in CPU memory under ``offload_activations``."""
        offload = self.memory["offload_activations"]
        if not offload:  # (the control's MLP is not tiled)
            return contextlib.nullcontext()
        model = self.model
        return _compat.recompute_with_attention(model, model.config._attn_implementation,
                                                offload=activation_offload(offload))

    def star_config(self, sample) -> StarConfig:
        return StarConfig(block_size=sample.block_size, anchor_size=sample.anchor_size, **self.star)

    def forward(self, sample):
        with many_shapes():
            return self._forward(sample)

    def _forward(self, sample):
        ctx, tgt, labels = sample.context_ids, sample.target_ids, sample.labels
        if (getattr(sample, "attention", "") or self.attention) == "global":  # the control, or a mixed-in step
            with self._offloading():
                loss, answer, context = global_train_loss(self.model, ctx, tgt, labels,
                                                          context_loss_weight=self.weight)
            share = loss if self.sp_rank == 0 else loss * 0.0
            info = {"loss": float(loss.detach()), "answer_loss": float(answer),
                    "context_loss": None if context is None else float(context)}
            return share, info
        config = self.star_config(sample)
        loss, parts = star_train_loss(self.model, ctx, tgt, labels, config, self.sp, context_loss_weight=self.weight,
                                      return_parts=True, **self.memory)
        info = {"loss": float(loss.detach()), "answer_loss": float(parts["answer"]),
                "context_loss": float(parts["context"].detach()) if self.weight else None}
        return loss, info
