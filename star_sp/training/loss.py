"""The training forward under the anchor pattern: ``star_train_loss``.

One step over a context and the segment after it (question and answer), on ``N`` hosts::

    context  [ B_0 | B_1 | ... | B_{n-1} ]   one contiguous run of blocks per host, each block i > 0
                                              encoded behind the anchor (phase 1, ``PrefillPass``)
    target   [ t_0 ... t_{Lt-1} ]             on every host; attends every host's context KV and,
                                              causally, its own KV (phase 2, ``QueryPass``)

It is exactly the plain model run once over ``[context ; target]`` under the dense ``M_star`` mask
(``docs/design.md``): a context token of block ``i > 0`` sees the anchor and the earlier tokens of its
block, a target token sees every earlier token.

The loss (the same value on every rank)::

    loss = CE(labelled target tokens) / n_labelled  +  w * CE(context tokens 1 .. Lc-1) / (B * (Lc-1))

``labels[:, t]`` is target token ``t``'s label, predicted from the position before it (for ``t = 0``
the last context token, on the last host); ``-100`` is ignored. The context term predicts token
``i + 1`` from position ``i`` under the Star pattern.

The gradient contract: each rank's backward covers its share of the loss (its own context rows'
terms, and the target rows' terms on the last host alone: every host computes the same target rows,
and their gradient reaches the other hosts through phase 2's backward). So after ``loss.backward()``
on every rank, the parameter gradients summed over the group (``reduce_gradients``) are exactly the
gradient of the loss for the plain model under ``M_star``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from .. import _compat
from ..config import StarConfig
from ..distributed.collectives import tie
from ..distributed.rows import Phase1Rows, phase1_rows
from ..integrations.hf.attention import ATTENTION_NAME
from ..integrations.hf.checks import dropout_error, plain_head
from ..integrations.hf.engine import StarEngine
from ..integrations.hf.tiled import tiled_mlp as tile_mlp
from ..layout import BlockLayout
from ..runtime.inputs import check_ids, fingerprint
from ..runtime.kv_cache import ContextKV, TrainingQueryKV
from ..runtime.offload import activation_offload, offload_error
from ..runtime.passes import PrefillPass, QueryPass, SplitPass, StarContext
from .terms import IGNORE_INDEX, HeadRows, RankShare, head_calls


def check_train_inputs(context_ids, target_ids, labels, weight, vocab: int) -> str | None:
    """What is wrong with a training step's ids, labels and context-loss weight, for any framework, or None."""
    error = check_ids("context_ids", context_ids, vocab) or check_ids("target_ids", target_ids, vocab)
    if error:
        return error
    if context_ids.shape[0] != target_ids.shape[0]:
        return (f"context_ids has batch {context_ids.shape[0]} but target_ids has batch {target_ids.shape[0]}; "
                "pass one target segment per context")
    if not isinstance(labels, torch.Tensor) or labels.shape != target_ids.shape or labels.is_floating_point():
        return (f"labels must be a LongTensor of target_ids' shape {tuple(target_ids.shape)} (token ids, -100 where "
                f"ignored), got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))]
    if bad.numel():
        return (f"labels hold token id {int(bad[0])}, outside the model's vocabulary of {vocab} ids; use token ids "
                f"or {IGNORE_INDEX} for positions without a loss")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        return f"context_loss_weight must be a finite number >= 0, got {weight!r}"
    if not bool((labels != IGNORE_INDEX).any()) and (weight == 0 or context_ids.shape[1] < 2):
        return ("nothing to learn from: every label is -100 and there is no context loss (context_loss_weight 0, "
                "or a one-token context); label at least one target token")
    return None


def train_meta(context_ids, target_ids, labels, config, weight, error: str | None) -> dict:
    """What every rank of a training step must agree on (``agreement.agree``): shapes, the ids' and labels'
    fingerprints, the config and weight, and whether gradients are on."""
    return {"shapes": (tuple(context_ids.shape), tuple(target_ids.shape)) if error is None else None,
            "ids": (fingerprint(context_ids), fingerprint(target_ids), fingerprint(labels + 100))
            if error is None else None,
            "config": config.to_dict() if isinstance(config, StarConfig) else None, "context_loss_weight": weight,
            "grad": torch.is_grad_enabled()}


def _check(model, context_ids, target_ids, labels, weight, vocab: int) -> str | None:
    error = check_train_inputs(context_ids, target_ids, labels, weight, vocab) or dropout_error(model)
    if error is None and _compat.gradient_checkpointing_on(model) and _compat.reentrant_checkpointing(model):
        error = ("star_train_loss takes non-reentrant activation checkpointing only (the reentrant kind runs each layer "
                 "first without gradients, which cuts phase 2's gradient path to the context's KV); enable it with "
                 "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
    return error


def star_train_loss(model, context_ids: torch.Tensor, target_ids: torch.Tensor, labels: torch.Tensor,
                    config: StarConfig, group: "dist.ProcessGroup | None" = None, *,
                    context_loss_weight: float = 0.0, return_parts: bool = False, offload_activations: bool | int = False,
                    loss_chunk_tokens: int = 4096, tiled_mlp: int = 0):
    """The loss of one training step under the anchor pattern (module docstring), differentiable.

    ``context_ids: LongTensor[B, Lc]``, ``target_ids, labels: LongTensor[B, Lt]``, the full tensors on
    every rank of ``group`` (``None``: one process holds every block). Every rank calls it with the same
    arguments and then ``loss.backward()`` (or ``torch.autograd.grad``); then ``reduce_gradients(model,
    group)`` sums the parameter gradients over the group. Any bad argument raises the same
    ``StarInputError`` on every rank. Activation checkpointing (``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs={'use_reentrant': False})``) recomputes each layer without collectives
    (``runtime/passes.py``); the reentrant kind is refused. ``offload_activations=True`` keeps what each
    checkpointed layer saves for its recomputation (its input) in host memory (``runtime/offload.py``),
    a whole number ``n`` only the first ``n`` layers' (the rest stay on the device); it needs
    checkpointing on.
    ``loss_chunk_tokens``: the logits of the rows the loss reads are computed this many rows at a time
    and recomputed in the backward pass (``HeadRows``); 0 computes them at once, as does a model whose
    head scales or soft-caps its logits. ``tiled_mlp``: each decoder layer's MLP runs over this many rows at
    a time, each chunk recomputed in the backward pass (``integrations/hf/tiled.py``; 0: untiled).

    ``return_parts=True`` returns ``(loss, {"answer": ..., "context": ...})``: the answer part (the target
    tokens' mean loss) and the context's mean next-token loss (unweighted; 0 when the weight is 0, as
    it is not computed then), detached, the same on every rank.
    """
    engine = StarEngine(model, config, group)  # checks the model and the config
    model = engine.model  # a peft model's adapted transformers model
    vocab = engine.vocab_size
    error = _check(model, context_ids, target_ids, labels, context_loss_weight, vocab)
    for name, value in (("loss_chunk_tokens", loss_chunk_tokens), ("tiled_mlp", tiled_mlp)):
        if error is None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            error = f"{name} must be a whole number of rows >= 0 (0: off), got {value!r}"
    error = error or offload_error(offload_activations)
    if error is None and offload_activations and not _compat.gradient_checkpointing_on(model):
        error = ("offload_activations=True offloads what activation checkpointing keeps; enable it first: "
                 "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
    meta = train_meta(context_ids, target_ids, labels, config, context_loss_weight, error)
    meta["memory"] = (loss_chunk_tokens, tiled_mlp, repr(offload_activations))  # the head's and MLP's calls
    engine._agree("train", meta, error)

    batch, lc = context_ids.shape
    lt = target_ids.shape[1]
    layout = BlockLayout.from_config(config, lc, engine.world_size, engine.rank)
    context = StarContext(layout=layout, config=config, batch_size=batch, kv=ContextKV(engine.num_layers),
                          group=group)
    n_labelled = int((labels != IGNORE_INDEX).sum())
    # one forward over [this rank's phase-1 rows | the target rows]: each layer's phase 2 reads its context
    # KV at once (distributed/rows.py: the phase-1 rows; an idle rank runs one stand-in row)
    rows = phase1_rows(layout, context_ids, recompute=config.anchor_source == "recompute",
                       context_loss=context_loss_weight > 0, answer_from_last=n_labelled > 0)
    prefill = PrefillPass(context, engine.num_layers, check=True, training=True)
    prefill.keep_alive = []  # the anchor broadcast's backward must run on the owner and every user
    query = QueryPass(context, engine.num_layers, TrainingQueryKV(engine.num_layers) if layout.is_query_host
                      else None, check=True, training=True, drops_context=True)
    ids = torch.cat([rows.ids, target_ids.to(rows.ids.device)], dim=1)
    positions = torch.cat([rows.positions, torch.arange(lc, lc + lt)])
    n = rows.num_rows
    keep = torch.tensor(rows.keep + list(range(n, n + max(lt - 1, 1))), device=engine.device)  # target rows
    offload = activation_offload(offload_activations)  # keep: the target rows predict labels[:, 1:]
    bound = lc + config.anchor_size + lt  # the rows of any rank's forward: the same bound on every rank
    tiles = (lambda: tile_mlp(model, head_calls(bound, tiled_mlp))) if tiled_mlp else contextlib.nullcontext
    with _compat.attn_implementation_set(model, ATTENTION_NAME), tiles(), \
            _compat.recompute_with_attention(model, ATTENTION_NAME, offload, tiles):
        kept = _kept_rows(engine, SplitPass(prefill, query, n), ids, positions, keep, loss_chunk_tokens)
    answer, context_mean, replicated = sample_terms(kept, head_calls(bound, loss_chunk_tokens), rows, context_ids,
                                                    labels, n_labelled)
    answer = tie(answer, *prefill.keep_alive)
    loss, answer_part, context_part = RankShare.apply(
        replicated, answer, context_mean, 1.0 if layout.is_query_host else 0.0, float(context_loss_weight), group,
        config.collective_timeout_s)
    return (loss, {"answer": answer_part, "context": context_part}) if return_parts else loss


def _kept_rows(engine: StarEngine, state, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
               chunk_tokens: int) -> HeadRows:
    """The rows ``keep`` of one forward, as final hidden states and the model's head (their logits then
    come a chunk at a time), or as their logits where the head is more than a projection or
    ``chunk_tokens`` is 0."""
    head = plain_head(engine.model) if chunk_tokens else None
    if head is None:
        return HeadRows(engine._forward(state, ids, positions, logits_to_keep=keep).logits)
    hidden = engine._forward(state, ids, positions).last_hidden_state
    return HeadRows(hidden.index_select(1, keep), head)


def sample_terms(kept: HeadRows, calls: int, rows: Phase1Rows, context_ids: torch.Tensor, labels: torch.Tensor,
                 n_labelled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(answer, context, replicated)``, the loss terms of one rank's kept rows: ``kept`` holds its phase-1
    rows ``rows.keep`` and then the target rows (the first ``Lt - 1`` predict ``labels[:, 1:]``), their
    cross-entropy from ``calls`` head calls (``HeadRows.row_losses``).

    ``answer``: the first label's term (the last context token, over ``n_labelled``), on the query host;
    ``context``: the rank's part of the context's mean next-token loss (over ``B * (Lc - 1)`` terms; 0 when
    ``rows.predicting`` is empty); ``replicated``: the target rows' mean over the labelled tokens. Every
    kept row joins the backward (0 x its loss where it owns no term), so every rank runs the same modules."""
    batch, lc = context_ids.shape
    n_kept, lt = len(rows.keep), labels.shape[1]
    targets = torch.full((batch, kept.num_rows), IGNORE_INDEX, dtype=torch.long, device=labels.device)
    p = rows.predicting
    if p:
        targets[:, : len(p)] = context_ids[:, p.start + 1: p.stop + 1]
    if rows.last:
        targets[:, n_kept - 1] = labels[:, 0]
    targets[:, n_kept: n_kept + lt - 1] = labels[:, 1:]
    ce = kept.row_losses(targets, calls)
    joined = 0 * ce.sum()
    answer = joined + (ce[:, n_kept - 1].sum() / n_labelled if rows.last else 0)
    context = ce[:, : len(p)].sum() / (batch * (lc - 1)) if p else torch.zeros_like(joined)
    replicated = ce[:, n_kept: n_kept + lt - 1].sum() / n_labelled if lt > 1 and n_labelled else torch.zeros_like(joined)
    return answer, context, replicated


