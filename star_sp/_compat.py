"""Every difference between library releases that star-sp works around, in one place."""

from __future__ import annotations

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


TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


# -- transformers ------------------------------------------------------------------------------

def cache_kwarg(model) -> str:
    """The name under which this transformers release takes the KV cache: ``cache`` from 5.2x on,
    ``past_key_values`` before (5.2x still accepts the old name, with a deprecation warning)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def set_attn_implementation(model, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # older releases read the private config field directly
        model.config._attn_implementation = name


def attn_implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)
