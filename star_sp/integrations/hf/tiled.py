"""Tiled MLP for transformers models: each decoder layer's MLP (``layer.mlp``, applied to every row on its
own) over ``chunk_tokens`` rows at a time, each chunk checkpointed, so that the MLP's intermediate
``(B, chunk, ffn)`` of one chunk exists at a time, in the forward and in the backward pass. The rows'
results are those of the whole call (the MLP mixes no rows); at 256K rows of an 8B model the untiled
intermediates take about 7 GB each.

Shapes: the MLP takes and returns ``(B, S, H)``; chunks split ``S``. Every call runs the MLP's modules
exactly ``calls`` times, the last chunks empty where a rank has fewer rows, so every rank of a group that
passes the same ``calls`` gathers their parameters as often as the others (ZeRO-3).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..._compat import patched


def _tiled(forward, calls: int, x: torch.Tensor) -> torch.Tensor:
    step = max(1, -(-x.shape[1] // calls))
    parts = []
    for i in range(calls):
        piece = x[:, i * step:(i + 1) * step]
        parts.append(checkpoint(forward, piece, use_reentrant=False) if torch.is_grad_enabled() else forward(piece))
    return torch.cat(parts, dim=1)


@contextlib.contextmanager
def tiled_mlp(model, calls: int):
    """While inside, every decoder layer's ``mlp`` runs in ``calls`` chunks of its rows (module docstring);
    put back afterwards. Entering it again inside (a recomputed layer) changes nothing."""
    mlps = [m.mlp for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)]
    mlps = [m for m in mlps if not getattr(m.forward, "star_sp_tiled", False)]

    def tiled(mlp):
        forward = functools.partial(_tiled, mlp.forward, calls)
        forward.star_sp_tiled = True
        return forward

    with patched(mlps, "forward", tiled):
        yield
