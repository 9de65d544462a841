"""The training loss of a Megatron-core GPT model under Star Attention: ``megatron_train_loss``.

The same loss and the same gradient contract as ``star_train_loss`` (``loss.py``), for a ``GPTModel``
built with ``integrations.megatron.star_layer_spec``, with Megatron's context-parallel (CP) group as the
Star group. Each CP rank runs ONE forward over its rows (``distributed/rows.py``)::

    [ phase-1 rows (its blocks, behind the anchor) | target rows (question and answer, on every rank) ]

and keeps its share of the loss: its context rows' terms, and the target rows' terms on the last rank
only (``RankShare``: one all-reduce gives every rank the loss's value). After ``loss.backward()`` on
every rank, ``reduce_gradients(model, cp_group)`` (the same function as for transformers models) leaves
on every rank exactly the gradient of the loss for the same model under the dense ``M_star`` mask over
``[context ; target]``.

``attention="global"``: the same with one block (the last rank runs the whole context, the others a
stand-in row), exact causal attention. ``attention="ring"``: exact ring attention over the whole
``[context ; target]`` split zigzag over the ranks, every row's terms counted where the row is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..config import ATTENTIONS, StarConfig
from ..distributed.agreement import agree_or_raise
from ..distributed.collectives import tie
from ..distributed.rows import phase1_rows
from ..integrations.megatron.attention import ForwardPlan, group_size
from ..integrations.megatron.inference import model_forward
from ..integrations.megatron.positions import use_star_positions
from ..integrations.megatron.recompute import recompute_error, recomputes, star_recompute
from ..layout import BlockLayout, RingLayout
from ..runtime.kv_cache import ContextKV, TrainingQueryKV
from ..runtime.offload import activation_offload, offload_error
from ..runtime.passes import PrefillPass, QueryPass, RingPrefillPass, StarContext
from .loss import check_train_inputs, sample_terms, train_meta
from .terms import IGNORE_INDEX, HeadRows, RankShare, ce_sum, head_calls


def _check(model, context_ids, target_ids, labels, weight, attention) -> str | None:
    vocab = getattr(model, "vocab_size", None) or model.config.padded_vocab_size
    error = check_train_inputs(context_ids, target_ids, labels, weight, vocab)
    if error:
        return error
    if attention not in ATTENTIONS:
        return f"attention must be one of {ATTENTIONS}, got {attention!r}"
    cfg = model.config
    if (cfg.hidden_dropout or 0) > 0 or (cfg.attention_dropout or 0) > 0:
        return (f"the model uses dropout (hidden {cfg.hidden_dropout}, attention {cfg.attention_dropout}); every CP "
                "rank computes the target rows and their masks would differ: set both to 0")
    error = recompute_error(cfg)
    if error is None and attention == "ring" and recomputes(model):
        error = ("attention='ring' does not recompute (its recomputation would repeat the ring's collectives in the "
                 "backward pass); set recompute_granularity to None for ring, or use attention='star' or 'global'")
    return error


def megatron_train_loss(model, context_ids: torch.Tensor, target_ids: torch.Tensor, labels: torch.Tensor,
                        config: StarConfig, group: "dist.ProcessGroup | None" = None, *,
                        context_loss_weight: float = 0.0, attention: str = "star", return_parts: bool = False,
                        loss_chunk_tokens: int = 4096, offload_activations: bool | int = False):
    """The loss of one training step (``star_train_loss``'s definition) for a Megatron-core GPT model,
    differentiable; ``group`` is the CP group (None: one process). ``context_ids [B, Lc]``,
    ``target_ids, labels [B, Lt]``: the full tensors on every rank. Any bad argument raises the same
    ``StarInputError`` on every rank. ``return_parts``: also ``{"answer", "context"}``, detached.
    ``loss_chunk_tokens``: the kept rows' logits are computed this many rows at a time (``HeadRows``;
    0: at once). Megatron's activation recomputation (``recompute_granularity`` full or selective) runs as
    torch's non-reentrant checkpoint, without collectives (``integrations/megatron/recompute.py``);
    ``offload_activations``: what it keeps waits in host memory (True: every checkpoint's, n: the first
    n's; ``runtime/offload.py``)."""
    use_star_positions(model)
    size, rank = group_size(group)
    error = _check(model, context_ids, target_ids, labels, context_loss_weight, attention)
    if error is None and not isinstance(config, StarConfig):
        error = f"config must be a star_sp.StarConfig, got {type(config).__name__}"
    error = error or offload_error(offload_activations, "checkpoints")
    if error is None and offload_activations and not recomputes(model):
        error = ("offload_activations offloads what activation recomputation keeps; set the model's "
                 "recompute_granularity ('full' or 'selective') first")
    meta = {**train_meta(context_ids, target_ids, labels, config, context_loss_weight, error), "attention": attention,
            "loss_chunk_tokens": loss_chunk_tokens, "offload": repr(offload_activations)}
    agree_or_raise(group, "train", meta, error)

    batch, lc = context_ids.shape
    lt = target_ids.shape[1]
    n_labelled = int((labels != IGNORE_INDEX).sum())
    num_layers = model.config.num_layers
    weight = float(context_loss_weight)
    if attention == "ring" and size > 1 and lc + lt >= 2 * size:
        return _ring_loss(model, context_ids, target_ids, labels, config, group, weight, n_labelled, return_parts)
    if attention != "star":
        config = replace(config, block_size=lc, anchor_size=lc)
    layout = BlockLayout.from_config(config, lc, size, rank)
    rows = phase1_rows(layout, context_ids, recompute=config.anchor_source == "recompute",
                       context_loss=weight > 0, answer_from_last=n_labelled > 0)
    context = StarContext(layout, config, batch, ContextKV(num_layers), group)
    # training passes: a layer called again is its recomputation (star_recompute), run without collectives
    prefill = PrefillPass(context, num_layers, training=True)
    prefill.keep_alive = []  # the anchor broadcast's backward must run on the owner and every user
    query = QueryPass(context, num_layers, TrainingQueryKV(num_layers) if layout.is_query_host else None,
                      training=True, drops_context=True)
    keep = rows.keep + list(range(rows.num_rows, rows.num_rows + lt))  # the kept phase-1 rows, the target rows
    step = ForwardPlan(torch.cat([rows.positions, torch.arange(lc, lc + lt)]), rows.num_rows, prefill, query, group, keep)
    with star_recompute(model, step, activation_offload(offload_activations)):
        hidden, project = model_forward(model, torch.cat([rows.ids, target_ids], dim=1), step, hidden=True)
    calls = head_calls(lc + config.anchor_size + lt, loss_chunk_tokens)  # alike on every rank
    answer, context_mean, replicated = sample_terms(HeadRows(hidden, project), calls, rows, context_ids, labels,
                                                    n_labelled)
    answer = tie(answer, *prefill.keep_alive)
    loss, answer_part, context_part = RankShare.apply(
        replicated, answer, context_mean, 1.0 if layout.is_query_host else 0.0, weight, group,
        config.collective_timeout_s)
    return (loss, {"answer": answer_part, "context": context_part}) if return_parts else loss


def _ring_loss(model, context_ids, target_ids, labels, config, group, weight, n_labelled, return_parts):
    """Ring attention over ``[context ; target]``: each rank's rows' terms, all local."""
    size, rank = group_size(group)
    batch, lc = context_ids.shape
    lt = target_ids.shape[1]
    ids = torch.cat([context_ids, target_ids], dim=1)
    layout = RingLayout(lc + lt, size, rank)
    num_layers = model.config.num_layers
    context = StarContext(layout, config, batch, ContextKV(num_layers), group)
    positions = layout.positions()
    # position p predicts token p + 1: a context token (p < Lc - 1) or a label (Lc - 1 <= p < Lc + Lt - 1)
    ctx_rows = (positions < lc - 1).nonzero().flatten().tolist() if weight > 0 else []
    ans_rows = ((positions >= lc - 1) & (positions < lc + lt - 1)).nonzero().flatten().tolist() if n_labelled else []
    keep = ctx_rows + ans_rows or [0]  # a rank whose rows own no term keeps one, at weight 0
    step = ForwardPlan(positions, layout.num_tokens, RingPrefillPass(context, num_layers), group=group, keep=keep)
    logits = model_forward(model, layout.shard(ids, 1), step)  # [B, len(keep), V]
    real = torch.float64 if logits.dtype == torch.float64 else torch.float32
    answer = 0 * logits.sum().to(real)  # every rank's rows join the backward
    n_ctx = len(ctx_rows)
    if ans_rows:
        answer = answer + ce_sum(logits[:, n_ctx:], labels[:, positions[ans_rows] - lc + 1]) / n_labelled
    context_mean = torch.zeros((), dtype=real, device=logits.device)
    if ctx_rows:
        context_mean = ce_sum(logits[:, :n_ctx], context_ids[:, positions[ctx_rows] + 1]) / (batch * (lc - 1))
    loss, answer_part, context_part = RankShare.apply(
        torch.zeros((), dtype=real, device=logits.device), answer, context_mean, 0.0, weight, group,
        config.collective_timeout_s)
    return (loss, {"answer": answer_part, "context": context_part}) if return_parts else loss


__all__ = ["megatron_train_loss"]
