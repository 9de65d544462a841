"""After the backward pass: the parameter gradients summed over a sequence-parallel group.

``star_train_loss`` leaves on each rank the gradient of that rank's share of the loss; their sum over
the group is the gradient of the loss. ``reduce_gradients`` forms it in place on every rank: one
all-reduce per gradient dtype over a flat float32 buffer (float64 stays float64), so low-precision
gradients are summed without N-way rounding. A parameter that a rank did not use (no ``.grad``) counts
as zeros there, and gets the group's sum like the others.

``guarded_backward`` runs ``loss.backward()`` as one guarded step: an error on one rank anywhere in the
backward pass (not only in star-sp's collectives) reaches the others as the same ``StarCollectiveError``
naming that rank, instead of leaving them to wait out a collective's timeout.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from ..distributed.guard import guarded_step, wait
from ..ops.merge import accumulation_dtype


def reduce_gradients(model: torch.nn.Module, group: "dist.ProcessGroup | None", *,
                     timeout_s: float = 600.0) -> None:
    """Sum every trainable parameter's ``.grad`` over ``group``, in place on every rank (no-op for
    ``group=None``)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    with guarded_step("reduce_gradients", group):
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            group_params = by_dtype[dtype]
            acc = accumulation_dtype(dtype)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(acc)
                              for p in group_params])
            wait(dist.all_reduce(flat, group=group, async_op=True), timeout_s, flat)
            offset = 0
            for p in group_params:
                n = p.numel()
                summed = flat[offset: offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = summed
                else:
                    p.grad.copy_(summed)
                offset += n


def guarded_backward(loss: torch.Tensor, group: "dist.ProcessGroup | None", **kwargs) -> None:
    """``loss.backward(**kwargs)`` where a failure on any rank becomes the same clear error on every rank."""
    with guarded_step("backward", group):
        loss.backward(**kwargs)


__all__ = ["guarded_backward", "reduce_gradients"]
