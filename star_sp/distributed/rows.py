"""Which rows one host runs through the model in phase 1 (prefill, and a Star training step), and which
of their logits a training loss needs. Framework-neutral: the transformers engine's prefill and loss
(``integrations/hf/engine.py``, ``training/loss.py``) and the Megatron-core ones
(``integrations/megatron/``, ``training/megatron_loss.py``) all build their phase-1 inputs from it.

A training sample is ``[context ; target]``. Every host runs its phase-1 rows (below) and, after them
(Megatron: in the same forward) or in a second forward (transformers), the ``Lt`` target rows, the
same on every host::

    phase-1 rows   [anchor tokens (recompute mode, hosts that need the anchor) ;] own context tokens
                   an idle host (no block): one stand-in row, the context's first token at position 0,
                   whose output is thrown away (its layers run as everywhere else)

Position ``i`` of the context predicts context token ``i + 1`` (the context loss, ``i < Lc - 1``);
the last context token (on the last host) predicts ``labels[:, 0]``; target row ``t < Lt - 1``
predicts ``labels[:, t + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BlockLayout


@dataclass(frozen=True)
class Phase1Rows:
    """One host's phase-1 rows of a training sample.

    ``ids [B, R]`` and ``positions [R]`` are the rows to run; ``keep`` the row indices whose logits the
    loss reads, in order: the rows predicting context tokens ``predicting.start + 1 ..
    predicting.stop`` (the context loss; empty when its weight is 0), then, when ``last``, the row of
    context token ``Lc - 1`` (it predicts ``labels[:, 0]``). ``keep`` is never empty: a host whose rows
    own no loss term keeps its last row, at weight 0, so that every host runs the same backward."""

    ids: torch.Tensor
    positions: torch.Tensor
    keep: list[int]
    predicting: range
    last: bool

    @property
    def num_rows(self) -> int:
        return self.ids.shape[1]


def phase1_rows(layout: BlockLayout, context_ids: torch.Tensor, *, recompute: bool, context_loss: bool,
                answer_from_last: bool) -> Phase1Rows:
    """This host's phase-1 rows (module docstring). ``context_loss``: the context's next-token terms are
    wanted; ``answer_from_last``: the last context token's logits predict a label (there is one)."""
    lc = layout.context_len
    if layout.is_idle:
        return Phase1Rows(context_ids[:, :1], torch.arange(1), [0], range(0), False)
    skip = layout.anchor_rows(recompute)
    start, end = layout.token_range
    ids = layout.shard(context_ids, 1)
    if skip:
        ids = torch.cat([context_ids[:, :skip], ids], dim=1)
    predicting = range(start, min(end, lc - 1)) if context_loss else range(0)
    keep = [skip + i - start for i in predicting]
    last = layout.is_query_host and answer_from_last
    if last:
        keep.append(skip + lc - 1 - start)
    return Phase1Rows(ids, layout.positions(recompute), keep or [ids.shape[1] - 1], predicting, last)
