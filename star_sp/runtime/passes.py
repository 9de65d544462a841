"""One model forward pass under Star Attention, independent of any model framework.

A framework adapter (``integrations/``) hands a pass to the model's attention layers (transformers: as
its KV cache, through ``TransformersCache``; Megatron-core: through the core-attention module's step).
For each layer the adapter calls ``update(k, v, layer)`` (store KV by the phase's policy) and then
``attend(layer, q, k, v, scale)``; ``seq_length(layer)`` is how many tokens precede the pass's rows'
keys (the context, and the query KV held so far):

- ``PrefillPass`` (phase 1): the rows are this host's blocks (``[anchor ;] own blocks`` in recompute
  mode). One process holding every block runs them as one block-sparse call; several hosts run
  ``phase1_attention`` (anchor KV broadcast per layer, or recomputed). Only the own blocks' KV is kept.
- ``RingPrefillPass`` (the exact baseline): the rows are this host's zigzag share of the context
  (``RingLayout``); each layer runs ``ring_attention`` over the whole context and keeps the own KV.
- ``QueryPass`` (phase 2): the rows are query or generated tokens, the same on every host. Each host
  attends its context KV; the query host also appends to and attends the query KV; results merge by
  all-reduce (``phase2_attention``), or locally in one process (``phase2_local``).
- ``DecodeStepPass`` (phase 2, one decode step with fixed shapes, so that it can be captured as a CUDA
  graph and replayed): as ``QueryPass``, but the query KV is a ``StaticQueryKV`` written and masked
  at a device-side position (``ops.valid_keys``) instead of sliced at a Python one.
- ``SplitPass`` (training): one forward over ``[phase-1 rows | phase-2 rows]``, each layer's first rows
  to a ``PrefillPass`` and the rest (the target tokens) to a ``QueryPass``; phase 2 reads the layer's
  context KV in the same layer, which then lets it go (across hosts under activation checkpointing the
  layer's phase-2 attention still keeps it among its saved tensors until the layer's backward).

Recomputation (activation checkpointing, training): a pass runs each layer once, so a second call of
a layer in the same pass is the backward pass recomputing it. It runs without any collective, so the
ranks may recompute in any order: ``PrefillPass`` stores the recomputed KV again and attends with the
anchor it received the first time (``phase1_attention(anchor=...)``), recomputing the local attention.
Across hosts ``QueryPass`` returns the layer's first output, whose attention kept its saved tensors
(the target rows are few; this avoids repeating phase 2's all-reduce); in one process it recomputes
the layer's phase 2 like any other operation. Reentrant checkpointing (the layer first run without
gradients) cannot keep phase 2's gradient path to the context's KV, so it is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import StarConfig
from ..distributed.guard import guarded_step
from ..distributed.phase1 import phase1_attention
from ..distributed.phase2 import MERGES, phase2_attention
from ..distributed.ring import ring_attention
from ..errors import StarInputError
from ..layout import BlockLayout, RingLayout
from ..ops.attention import default_scale
from ..ops.merge import accumulation_dtype, merge_into_
from ..ops.star import (can_fuse_anchor, local_attention, merge_own_keys_, per_sequence_context_attention, phase1_parts,
                        phase2_local, phase2_parts, shared_context_attention)
from ..ops.valid_keys import valid_keys_attention
from .kv_cache import ContextKV, QueryKV, StaticQueryKV


def _no_keys(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of rows over no key at all, in the accumulation dtype: 0 and -inf (a merge ignores it)."""
    acc = accumulation_dtype(q.dtype)
    return (torch.zeros(q.shape, dtype=acc, device=q.device),
            torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device))


def _same_backward(out: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
    """``out``, with tensors this host computed but does not use joined at weight 0 when gradients are
    on: so that every host runs the same modules' backward (ZeRO-3 gathers a module's parameters in its
    backward, on every rank alike; a projection whose output reaches no loss on one host would break
    that). In training, a host without the query KV drops the target rows' K and V; an idle host's
    stand-in row drops its Q and K."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in unused):
        return out
    return out + sum(0 * t.sum() for t in unused).to(out.dtype)


@dataclass
class StarContext:
    """What phase 1 made: this host's context KV and where the context sits. Read-only afterwards."""

    layout: BlockLayout | RingLayout
    config: StarConfig
    batch_size: int
    kv: ContextKV
    group: "dist.ProcessGroup | None" = None
    fingerprint: int = 0
    """A checksum of the context ids, to check that queries come with the context they were made for."""
    model_spec: dict = field(default_factory=dict)
    """What the KV was made with (layers, KV heads, head dim, dtype, device), checked against the model
    that answers a query."""
    model_ref: "Callable[[], object] | None" = None
    """A weak reference to the model that made the KV: a context answers queries only with that model."""
    sequences: "list[StarContext] | None" = None
    """Several contexts of different lengths, one per sequence (each with its own layout and KV); the
    fields above are then those of the batch (``layout``: the longest's)."""

    @property
    def context_len(self) -> int:
        return self.layout.context_len

    @property
    def context_lens(self) -> list[int]:
        """Each sequence's context length."""
        if self.sequences is None:
            return [self.context_len] * self.batch_size
        return [c.context_len for c in self.sequences]

    def shares_across_rows(self, rows: int) -> bool:
        """Whether ``rows`` sequences read this context's KV otherwise than row for row: several contexts
        (each row its own), or one context (batch 1) for several questions."""
        return self.sequences is not None or self.batch_size != rows


@dataclass
class _Pass:
    context: StarContext
    num_layers: int
    check: bool = True
    """Run phase 1's or phase 2's agreement step (tensor shapes, dtypes) in the first layer."""
    progress: Callable[[int, int], None] | None = None
    training: bool = False
    """A training pass: its layers may be recomputed in the backward pass (module docstring)."""

    def __post_init__(self) -> None:
        self._outputs: dict[int, object] = {}  # training: what a layer's first attend returned or received
        self._grad_at_start = torch.is_grad_enabled()

    def _check_grad(self) -> None:
        """A training pass built with gradients on whose layer runs without them: a reentrant checkpoint."""
        if self.training and self._grad_at_start and not torch.is_grad_enabled():
            raise StarInputError("a training pass ran a layer without gradients: reentrant activation "
                                 "checkpointing, which cannot keep phase 2's gradient path to the context's KV; "
                                 "use non-reentrant checkpointing, e.g. model.gradient_checkpointing_enable("
                                 "gradient_checkpointing_kwargs={'use_reentrant': False})")

    @property
    def group(self):
        return self.context.group

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def _tick(self, layer: int) -> None:
        if self.progress is not None:
            self.progress(layer + 1, self.num_layers)

    def _shared_context_part(self, q, layer: int, scale: float | None):
        """This host's context part for rows that do not map one to one onto the context's batch
        (``StarContext.shares_across_rows``), in the accumulation dtype. Inference only."""
        backend = self.context.config.backend
        if self.context.sequences is not None:
            return per_sequence_context_attention(q, [c.kv.get(layer) for c in self.context.sequences], scale=scale,
                                                  backend=backend)
        ctx_k, ctx_v = self.context.kv.get(layer)
        out, lse = shared_context_attention(q, ctx_k, ctx_v, scale=scale, backend=backend)
        acc = accumulation_dtype(q.dtype)
        return out.to(acc), lse.to(acc)

    def seq_length(self, layer: int = 0) -> int:
        return self.context.context_len


class PrefillPass(_Pass):
    """Phase 1 over this host's rows. ``keep_alive``: see ``phase1_attention`` (training sets it).

    An idle host (no block) runs the model over one stand-in row, the context's first token: its
    layers run as everywhere else (so ZeRO-3 gathers the same parameters, and the empty KV it keeps
    and hands to ``phase1_attention`` is its own projections' output, sliced to nothing, needing a
    gradient exactly where the other hosts' KV does); the row attends itself only, and its output
    is thrown away."""

    keep_alive: list | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int, *args, **kwargs):
        layout = self.context.layout  # a recomputation stores the recomputed KV again, for phase 2's recomputation
        skip = k.shape[2] if layout.is_idle else layout.anchor_rows(self.context.config.anchor_source == "recompute")
        self.context.kv.store(layer, k[:, :, skip:], v[:, :, skip:])
        return k, v

    def _phase1(self, layer: int, q, k, v, scale: float | None):
        """``phase1_attention`` for this layer; a recomputation reuses the anchor its first run received."""
        cfg = self.context.config
        again = layer in self._outputs
        received = None if again or not self.training else []
        out, _ = phase1_attention(q, k, v, self.context.layout, group=self.group, anchor_source=cfg.anchor_source,
                                  scale=scale, backend=cfg.backend, check=self.check and layer == 0,
                                  timeout_s=cfg.collective_timeout_s, keep_alive=None if again else self.keep_alive,
                                  anchor=self._outputs.get(layer), received=received)
        if received is not None:
            self._outputs[layer] = received[0]
        return out

    def attend(self, layer: int, q, k, v, scale: float | None):
        cfg, layout = self.context.config, self.context.layout
        self._check_grad()
        if layout.is_idle:  # the stand-in row: phase 1's collectives with no rows, then the row alone
            self._phase1(layer, q[:, :, :0], k[:, :, :0], v[:, :, :0], scale)
            self._tick(layer)
            out = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).to(q.dtype)  # softmax over one key
            return _same_backward(out, q, k)
        if self.distributed:
            out = self._phase1(layer, q, k, v, scale)
        else:
            parts = phase1_parts(k, v, layout.block_lengths, has_block0=True, anchor_len=layout.anchor_len,
                                 fuse_anchor=can_fuse_anchor(q, k, v, cfg.backend))
            out, _ = local_attention(q, parts, scale=scale, backend=cfg.backend)
        self._tick(layer)
        return out


class RingPrefillPass(_Pass):
    """Exact causal prefill by ring attention over this host's zigzag rows; keeps all of their KV."""

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int, *args, **kwargs):
        self.context.kv.store(layer, k, v)
        return k, v

    def attend(self, layer: int, q, k, v, scale: float | None):
        cfg = self.context.config
        out, _ = ring_attention(q, k, v, self.context.layout, group=self.group, scale=scale, backend=cfg.backend,
                                check=self.check and layer == 0, timeout_s=cfg.collective_timeout_s)
        self._tick(layer)
        return out


class QueryPass(_Pass):
    """Phase 2 for query or generated rows; ``query_kv`` is None on hosts that hold no query KV."""

    def __init__(self, context: StarContext, num_layers: int, query_kv: QueryKV | None, *,
                 drops_context: bool = False, **kw):
        super().__init__(context, num_layers, **kw)
        self.query_kv = query_kv
        self.drops_context = drops_context  # a SplitPass's: the layer's context KV is read once, then let go
        self._current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._appended: set[int] = set()  # training: the layers whose query KV this pass appended

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int, *args, **kwargs):
        if self.query_kv is not None:
            # inference appends each call (one pass may serve several decode steps); training once per layer,
            # a recomputation's KV equalling the first
            if not self.training or layer not in self._appended:
                k, v = self.query_kv.append(layer, k, v)
                self._appended.add(layer)
            self._current[layer] = (k, v)
        return k, v

    def attend(self, layer: int, q, k, v, scale: float | None):
        if layer in self._outputs:  # recomputed in the backward pass: the first run's output, no collective
            self._current.pop(layer, None)
            self._drop_context(layer)
            return self._outputs[layer]
        self._check_grad()
        if not self.training or not self.distributed:  # no collective: a recomputation recomputes this too
            out = self._attend(layer, q, k, v, scale)
        else:
            # a checkpoint around the layer drops what autograd saves and recomputes it; the attention's
            # own saved tensors are kept instead (identity hooks), since the recomputation does not rerun it
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                out = self._attend(layer, q, k, v, scale)
            self._outputs[layer] = out
        self._drop_context(layer)
        return out

    def _drop_context(self, layer: int) -> None:
        if self.drops_context:
            self.context.kv.drop(layer)

    def _attend(self, layer: int, q, k, v, scale: float | None):
        cfg = self.context.config
        query = self._current.pop(layer, None)
        if self.context.shares_across_rows(q.shape[0]):  # several questions or contexts (inference)
            with guarded_step("phase2", self.group):  # the local parts too, as in phase2_attention
                out, lse = self._shared_context_part(q, layer, scale)
                if query is not None:
                    merge_own_keys_(out, lse, q, *query, starts=getattr(self.query_kv, "starts", None), scale=scale,
                                    backend=cfg.backend)
                if self.distributed:
                    out, lse = MERGES[cfg.phase2_merge](self.group, cfg.collective_timeout_s).merge(out, lse)
            self._tick(layer)
            return out.to(q.dtype)
        ctx_k, ctx_v = self.context.kv.get(layer)
        if self.distributed:
            out, _ = phase2_attention(q, ctx_k, ctx_v, group=self.group,
                                      query_k=None if query is None else query[0],
                                      query_v=None if query is None else query[1],
                                      scale=scale, backend=cfg.backend, check=self.check and layer == 0,
                                      timeout_s=cfg.collective_timeout_s, merge=cfg.phase2_merge)
        else:
            out, _ = phase2_local(q, ctx_k, ctx_v, *query, scale=scale, backend=cfg.backend)
        self._tick(layer)
        return out if query is not None else _same_backward(out, k, v)  # K, V of the rows: dropped here

    def seq_length(self, layer: int = 0) -> int:
        held = 0 if self.query_kv is None else self.query_kv.length[layer]
        return self.context.context_len + held


class SplitPass:
    """One training forward over ``[phase-1 rows | phase-2 rows]`` (``rows (B, ., n + m, .)``): at each layer
    the first ``context_rows`` rows' KV and attention go to ``prefill``, the rest to ``query`` (a
    ``QueryPass`` built with ``drops_context=True``), and the outputs are stacked in the same order."""

    def __init__(self, prefill: PrefillPass, query: QueryPass, context_rows: int):
        self.prefill, self.query, self.context_rows = prefill, query, context_rows
        self._kv: dict[int, list] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int, *args, **kwargs):
        n = self.context_rows
        self._kv[layer] = [self.prefill.update(k[:, :, :n], v[:, :, :n], layer),
                           self.query.update(k[:, :, n:], v[:, :, n:], layer)]
        return k, v

    def attend(self, layer: int, q, k, v, scale: float | None):
        n = self.context_rows
        (kc, vc), (kt, vt) = self._kv.pop(layer)
        out_c = self.prefill.attend(layer, q[:, :, :n], kc, vc, scale)
        out_t = self.query.attend(layer, q[:, :, n:], kt, vt, scale)
        return torch.cat([out_c, out_t], dim=2)

    def seq_length(self, layer: int = 0) -> int:
        return self.prefill.seq_length(layer)


class DecodeStepPass(_Pass):
    """One decode step (one new token per sequence) with fixed shapes: nothing in it depends on a Python
    number that changes from step to step, so a CUDA graph of it replays correctly. ``query_kv`` is
    None on hosts that hold no query KV. Each row attends this host's context KV (the fused kernels)
    and, on the query host, every token of the query KV up to and including the step's own
    (``valid_keys_attention`` over the whole buffer); the two merge in float32 and, across hosts, by the
    configured all-reduce merge. The step ends with ``finish()``, which advances the KV's fill level."""

    def __init__(self, context: StarContext, num_layers: int, query_kv: StaticQueryKV | None, **kw):
        super().__init__(context, num_layers, **kw)
        self.query_kv = query_kv
        self._valid: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int, *args, **kwargs):
        if k.shape[2] != 1:
            raise StarInputError(f"a decode step takes one token per sequence, got {k.shape[2]}; run the query "
                                 "through QueryPass")
        if self.query_kv is not None:
            k, v = self.query_kv.write(layer, k, v)
        return k, v

    def attend(self, layer: int, q, k, v, scale: float | None):
        with guarded_step("decode", self.group):  # the local parts too: a failure there reaches every rank
            out = self._attend(layer, q, k, v, scale)
        self._tick(layer)
        return out.to(q.dtype)

    def _attend(self, layer: int, q, k, v, scale: float | None):
        cfg = self.context.config
        scale = default_scale(q.shape[-1]) if scale is None else scale
        if self.query_kv is not None and self._valid is None:  # once per step, shared by the layers
            self._valid = self.query_kv.valid(1)
        if cfg.decode_kernel == "triton" and self.context.sequences is None:
            out, lse = self._local_split_kv(layer, q, k, v, scale)
        else:
            out, lse = self._local(layer, q, k, v, scale)
        if self.distributed:
            out, lse = MERGES[cfg.phase2_merge](self.group, cfg.collective_timeout_s).merge(out, lse)
        return out

    def _local(self, layer: int, q, k, v, scale: float):
        """This host's part, in the accumulation dtype: its context KV by the fused kernels, and the step's
        own KV (``valid_keys_attention``) merged in."""
        parts = None if self.context.shares_across_rows(q.shape[0]) else phase2_parts(
            (0, q.shape[2]), *self.context.kv.get(layer))
        if parts is None:  # several questions or contexts
            out, lse = self._shared_context_part(q, layer, scale)
        elif parts:
            out, lse = local_attention(q, parts, scale=scale, backend=self.context.config.backend)
            out = out.to(accumulation_dtype(q.dtype))
        else:  # an idle host: no context keys
            out, lse = _no_keys(q)
        if self.query_kv is not None:
            merge_into_(out, lse, *valid_keys_attention(q, k, v, self._valid, scale))
        return out, lse

    def _local_split_kv(self, layer: int, q, k, v, scale: float):
        """``decode_kernel='triton'``: this host's part, its context KV and the step's own in one split-KV
        pass (``ops/decode_kernel.py``)."""
        from ..ops.decode_kernel import split_kv_decode

        if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise StarInputError(f"decode_kernel='triton' runs on CUDA devices, not {q.device.type}; use "
                                 "decode_kernel='torch'")
        ctx_k, ctx_v = self.context.kv.get(layer)
        if ctx_k.shape[2] == 0:
            ctx_k = ctx_v = None  # an idle host: no context keys
        own = (k, v, self._valid) if self.query_kv is not None else (None, None, None)
        if ctx_k is None and own[0] is None:
            return _no_keys(q)
        return split_kv_decode(q, ctx_k, ctx_v, *own, scale, out_dtype=accumulation_dtype(q.dtype))

    def finish(self, advance: bool = True) -> None:
        """After the model's forward: move the query KV's fill level past this step's token (``advance``;
        False for a warm-up run, whose KV write the next step overwrites)."""
        if advance and self.query_kv is not None:
            self.query_kv.advance(1)
        self._valid = None

    def seq_length(self, layer: int = 0) -> int:
        return self.context.context_len + (0 if self.query_kv is None else self.query_kv.capacity)
