"""Every difference between library releases that star-sp works around, in one place."""

from __future__ import annotations

import contextlib

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
