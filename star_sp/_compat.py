"""Every difference between library releases that star-sp works around, in one place."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def default_store() -> "dist.Store | None":
    """The key-value store of the default process group, or None where this torch hides it.

    Used only to tell other ranks which rank failed in which step (``distributed/guard.py``).
    """
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None or not dist.is_initialized():
        return None
    try:
        return getter()
    except Exception:  # noqa: BLE001 - any failure here only costs a less precise error message
        return None


def global_rank(group: "dist.ProcessGroup", group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (collectives take global ranks as src/dst)."""
    return dist.get_global_rank(group, group_rank)


# -- transformers ------------------------------------------------------------------------------

def cache_kwarg(model) -> str:
    """The name under which this transformers release takes the KV cache: ``cache`` from 5.2x on,
    ``past_key_values`` before (5.2x still accepts the old name, with a deprecation warning)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def gradient_checkpointing_on(model) -> bool:
    """Whether a transformers model recomputes its layers in the backward pass (the property is
    ``is_activation_checkpointing`` from transformers 5.2x, ``is_gradient_checkpointing`` before)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def reentrant_checkpointing(model) -> bool:
    """Whether a transformers model's activation checkpointing is the reentrant kind: the layers'
    checkpoint function (a ``functools.partial`` of ``torch.utils.checkpoint.checkpoint``) passes
    ``use_reentrant=True``, or leaves it to torch's default, which is reentrant."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


def set_attn_implementation(model, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # older releases read the private config field directly
        model.config._attn_implementation = name


@contextlib.contextmanager
def attn_implementation_set(model, name: str):
    """Switch ``model`` to the attention implementation ``name`` for the ``with`` block, then back to the
    one it had (``set_attn_implementation`` switches a model for good)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == name:
        yield
        return
    set_attn_implementation(model, name)
    try:
        yield
    finally:
        if previous is not None:
            set_attn_implementation(model, previous)


@contextlib.contextmanager
def recompute_with_attention(model, name: str, offload=None, inside=None):
    """While inside, the layers that activation checkpointing recomputes run their forward, at first and
    when the backward pass recomputes it (after the ``with`` block, in ``loss.backward()``), with the
    attention implementation ``name``: otherwise the recomputation would run the model's own attention.
    Each checkpointing layer's checkpoint function (``_gradient_checkpointing_func``, which
    ``gradient_checkpointing_enable`` sets) is wrapped for the block and put back afterwards.

    ``offload`` (a ``runtime.offload.ActivationOffload``): what the forward's ``i``-th checkpoint call (the
    ``i``-th layer) keeps for its recomputation, the layer's inputs, waits in host memory
    (``offload.for_checkpoint(i)``).
    ``inside()``: a context manager each layer's forward also runs in, at first and when recomputed."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and getattr(m, "_gradient_checkpointing_func", None) is not None]

    calls = [0]  # checkpoint calls so far in the forward: the layers in their order

    def wrapped(m):
        checkpoint = m._gradient_checkpointing_func

        def under(function, *args, **kwargs):
            def run(*inner, **inner_kw):
                with attn_implementation_set(model, name), inside() if inside else contextlib.nullcontext():
                    return function(*inner, **inner_kw)
            index, calls[0] = calls[0], calls[0] + 1
            with offload.for_checkpoint(index) if offload is not None else contextlib.nullcontext():
                return checkpoint(run, *args, **kwargs)
        return under

    with patched(layers, "_gradient_checkpointing_func", wrapped):
        try:
            yield
        finally:
            if offload is not None:
                offload.done()


@contextlib.contextmanager
def patched(objects, name: str, value_for):
    """While inside, each object's attribute ``name`` is ``value_for(obj)`` (set on the instance); afterwards
    the instance's own value again, or none (its class's) where it had none."""
    saved = [(obj, obj.__dict__.get(name)) for obj in objects]
    for obj in objects:
        setattr(obj, name, value_for(obj))
    try:
        yield
    finally:
        for obj, own in saved:
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)
