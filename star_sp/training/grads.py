"""After the backward pass: the parameter gradients summed over a sequence-parallel group.

``star_train_loss`` leaves on each rank the gradient of that rank's share of the loss; their sum over
the group is the gradient of the loss. ``reduce_gradients`` forms it in place on every rank, in float32
for low-precision gradients (float64 stays float64), so they are summed without N-way rounding, in
buckets of at most ``bucket_elements`` elements (one all-reduce each; the float32 copy never holds more
than one bucket). A parameter with no ``.grad`` on some rank (unused there) counts as zeros and gets
the group's sum; one that has none on any rank keeps none (an optimizer skips it, as it would have).

``guarded_backward`` runs ``loss.backward()`` as one guarded step: an error on one rank anywhere in the
backward pass (not only in star-sp's collectives) reaches the others as the same ``StarCollectiveError``
naming that rank, by the collective timeout, instead of an unexplained timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.guard import guarded_step, wait
from ..ops.merge import accumulation_dtype

BUCKET_ELEMENTS = 2**26  # 256 MB of float32 per all-reduce


def _buckets(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of parameters of one dtype and device, at most ``limit`` elements each (a
    larger parameter is a bucket of its own)."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        if out and out[-1][0].dtype == p.dtype and out[-1][0].device == p.device and size + p.numel() <= limit:
            out[-1].append(p)
            size += p.numel()
        else:
            out.append([p])
            size = p.numel()
    return out


def reduce_gradients(model: torch.nn.Module, group: "dist.ProcessGroup | None", *, timeout_s: float = 600.0,
                     bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Sum every trainable parameter's ``.grad`` over ``group``, in place on every rank (no-op for
    ``group=None`` or a group of one). A parameter without ``.grad`` on some ranks counts as zeros there
    and ends with the sum on every rank; one without on every rank keeps ``None`` on every rank (the
    ranks first agree which is which, so all run the same all-reduces in the same order): a caller that
    then scales or reads every ``.grad`` fills those first."""
    if group is None or dist.get_world_size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    with guarded_step("reduce_gradients", group):
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        wait(dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout_s, has)
        used = [p for p, flag in zip(params, has.tolist()) if flag]
        for bucket in _buckets(used, bucket_elements):
            acc = accumulation_dtype(bucket[0].dtype)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(acc)
                              for p in bucket])
            wait(dist.all_reduce(flat, group=group, async_op=True), timeout_s, flat)
            offset = 0
            for p in bucket:
                summed = flat[offset: offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.to(p.dtype, copy=True)
                else:
                    p.grad.copy_(summed)
                offset += p.numel()


def guarded_backward(loss: torch.Tensor, group: "dist.ProcessGroup | None", **kwargs) -> None:
    """``loss.backward(**kwargs)`` where a failure on any rank becomes the same clear error on every rank."""
    with guarded_step("backward", group):
        loss.backward(**kwargs)


__all__ = ["guarded_backward", "reduce_gradients"]
