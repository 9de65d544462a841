"""Megatron's activation recomputation under Star: ``recompute_granularity`` full and selective.

Megatron checkpoints through ``tensor_parallel.checkpoint``, a *reentrant* checkpoint: it runs the region
first without gradients, which would cut phase 2's gradient path to the context's KV. While inside
``star_recompute(model, plan)``, that function is torch's non-reentrant checkpoint instead, and the
region's recomputation (in the backward pass, after the forward has returned) runs inside the same
``ForwardPlan``. The passes then recompute without collectives (``runtime/passes.py``: a second call of a
layer in a training pass is its recomputation), so the ranks may reach their recomputations in any order.

What each granularity recomputes (Megatron's ``TransformerConfig``)::

    full       whole layers (recompute_method uniform: chunks of recompute_num_layers; block: the first
               recompute_num_layers layers); each chunk keeps its input
    selective  the modules in recompute_modules: core_attn (Star's attention, keeping its q, k, v), mlp

Megatron's dropout RNG tracking is not carried over: the training loss refuses dropout anyway (every rank
computes the target rows). FP8/FP4 recomputation (TransformerEngine's checkpoint) and
``distribute_saved_activations`` (tensor parallelism, which Star's module refuses) are refused.
"""

from __future__ import annotations

import contextlib

import torch

from ... import _compat
from .attention import running

SELECTIVE_MODULES = ("core_attn", "mlp")
"""The selective recomputation modules that run under Star (a dense GPT layer's). ``layernorm`` recomputes
through Megatron's ``CheckpointWithoutOutput``, which needs TransformerEngine in megatron-core 0.16: refused."""


def recompute_error(config) -> str | None:
    """What in a Megatron ``TransformerConfig``'s recomputation settings cannot run under Star, or None."""
    granularity = getattr(config, "recompute_granularity", None)
    if not granularity:
        return None
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return ("recompute_granularity with fp8/fp4 recomputes through TransformerEngine's checkpoint, which Star does "
                "not take; train without fp8 or set recompute_granularity to None")
    if getattr(config, "distribute_saved_activations", False):
        return "distribute_saved_activations is not supported under Star (tensor parallel size 1); set it to False"
    if granularity == "selective":
        modules = list(getattr(config, "recompute_modules", None) or ["core_attn"])
        other = [m for m in modules if m not in SELECTIVE_MODULES]
        if other:
            return (f"selective recomputation of {other} is not supported under Star; recompute_modules may hold "
                    f"{list(SELECTIVE_MODULES)}")
    return None


def recomputes(model) -> bool:
    """Whether a Megatron model's config asks for activation recomputation."""
    return bool(getattr(model.config, "recompute_granularity", None))


@contextlib.contextmanager
def star_recompute(model, plan, offload=None):
    """While inside, Megatron's checkpoint function is torch's non-reentrant checkpoint, recomputing under
    ``plan`` (module docstring). Nothing changes for a model without recomputation. ``offload`` (a
    ``runtime.offload.ActivationOffload``): what the ``i``-th checkpoint call keeps waits in host memory."""
    if not recomputes(model):
        yield
        return
    from megatron.core import tensor_parallel

    calls = [0]

    def checkpoint(function, distribute_saved_activations, *args):
        def run(*inner):
            with running(plan):  # the recomputation runs in the backward pass, outside the forward's plan
                return function(*inner)
        index, calls[0] = calls[0], calls[0] + 1
        with offload.for_checkpoint(index) if offload is not None else contextlib.nullcontext():
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    with _compat.patched([tensor_parallel], "checkpoint", lambda _module: checkpoint):
        try:
            yield
        finally:
            if offload is not None:
                offload.done()


__all__ = ["SELECTIVE_MODULES", "recompute_error", "recomputes", "star_recompute"]
