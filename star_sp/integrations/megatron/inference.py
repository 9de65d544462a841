"""Inference on a Megatron-core GPT model under Star: ``megatron_prefill`` (phase 1 on every CP rank) and
``megatron_generate`` (phase 2 and greedy decoding through the shared decode loop, ``runtime/generate.py``).

``model_forward(model, ids [B, rows], plan)`` is the one model forward both use (and the training loss):
logits ``[B, rows, V]``, or ``[B, len(plan.keep), V]`` when the plan names the rows to keep.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from ..._compat import patched
from ...config import ATTENTIONS, StarConfig
from ...distributed.agreement import agree_or_raise
from ...distributed.guard import guarded_step
from ...distributed.rows import phase1_rows
from ...errors import StarInputError
from ...layout import BlockLayout, RingLayout
from ...runtime.generate import StopRule, decode_tokens
from ...runtime.inputs import check_ids, fingerprint
from ...runtime.kv_cache import ContextKV, QueryKV
from ...runtime.passes import PrefillPass, QueryPass, RingPrefillPass, StarContext
from ...runtime.sampling import SamplingConfig
from .attention import ForwardPlan, group_size, running
from .positions import use_star_positions


def model_device(model) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def model_forward(model, ids: torch.Tensor, step: ForwardPlan, *, hidden: bool = False):
    """The model's logits ``[B, rows, V]`` for ``ids [B, rows]`` under ``step`` (``[B, len(keep), V]``
    with ``step.keep``: the vocabulary projection runs on those rows only, as transformers'
    ``logits_to_keep`` does; at 64K rows and a 128K vocabulary the full logits are 17 GB in bf16).

    ``hidden=True`` (with ``step.keep``): ``(h [B, len(keep), H], project)``, the kept rows' final hidden
    states and ``project(h [B, r, H]) -> logits [B, r, V]``, the output layer as the model runs it, so a
    loss can compute the logits a chunk at a time."""
    use_star_positions(model)
    device = model_device(model)
    projection = [] if hidden else None
    with running(step), _output_rows(model, step.keep, device, projection):
        positions = step.positions.to(device)[None].expand(ids.shape[0], -1)
        logits = model(ids.to(device), positions, None)
    if step.keep is not None and logits.shape[1] != len(step.keep):
        raise StarInputError(f"the model returned logits for {logits.shape[1]} rows, not the {len(step.keep)} asked for: "
                             "pass the GPTModel itself (not a wrapper around it)")
    return (logits, projection[0]) if hidden else logits


@contextlib.contextmanager
def _output_rows(model, keep: list[int] | None, device, projection: list | None = None):
    """While inside, the model's output layer projects only the hidden states of rows ``keep``; given
    ``projection`` (a list), it projects nothing: it returns those rows' hidden states and appends the
    projection with the arguments the model gave it."""
    layer = getattr(model, "output_layer", None)
    if keep is None or layer is None:
        if projection is not None:
            raise StarInputError("hidden states come from a GPTModel forward with rows to keep (a plan's keep)")
        yield
        return
    rows = torch.tensor(keep, dtype=torch.long, device=device)
    project = layer.forward

    def forward(hidden, *args, **kwargs):  # hidden [rows, B, H]
        kept = hidden.index_select(0, rows)
        if projection is None:
            return project(kept, *args, **kwargs)
        projection.append(lambda h: project(h.transpose(0, 1), *args, **kwargs)[0].transpose(0, 1))
        return kept, None

    with patched([layer], "forward", lambda _: forward):  # a forward the instance had is put back afterwards
        yield


@contextlib.contextmanager
def _one_step(step: str, group):
    """A group-wide call as one guarded step of ``group`` (``distributed/guard.py``): an error on any
    rank, in Star's attention or elsewhere in the model, reaches every rank as the same error naming
    that rank, before the others time out in their next collective. The call ends with an agreement
    of every rank, so a failure in the local layers after its last collective does not leave the
    other ranks returning."""
    if group is None:
        yield
        return
    with guarded_step(step, group):
        yield
        agree_or_raise(group, step, {}, None)  # every rank got to the end of the call


def vocab_size(model) -> int:
    return getattr(model, "vocab_size", None) or model.config.padded_vocab_size


def megatron_prefill(model, context_ids: torch.Tensor, config: StarConfig, group=None, *,
                     attention: str = "star") -> StarContext:
    """Phase 1 on every rank of ``group`` (Megatron's CP group): this rank's blocks behind the anchor
    (``ring``: its zigzag share, exact). ``context_ids [B, Lc]``, the full ids on every rank. Returns
    the rank's ``StarContext`` (its own blocks' KV) for ``megatron_generate``."""
    with _one_step("prefill", group):
        use_star_positions(model)
        error = check_ids("context_ids", context_ids, vocab_size(model))
        if error is None and attention not in ATTENTIONS:
            error = f"attention must be one of {ATTENTIONS}, got {attention!r}"
        if error is None and not isinstance(config, StarConfig):
            error = f"config must be a star_sp.StarConfig, got {type(config).__name__}"
        agree_or_raise(group, "prefill", {"ids": None if error else fingerprint(context_ids), "attention": attention,
                                   "config": None if error else config.to_dict()}, error)
        size, rank = group_size(group)
        lc = context_ids.shape[1]
        num_layers = model.config.num_layers
        if attention == "ring" and size > 1 and lc >= 2 * size:
            layout = RingLayout(lc, size, rank)
            context = StarContext(layout, config, context_ids.shape[0], ContextKV(num_layers), group)
            step = ForwardPlan(layout.positions(), layout.num_tokens, RingPrefillPass(context, num_layers), group=group, keep=[0])
            ids = layout.shard(context_ids, 1)
        else:
            if attention != "star":  # global (or ring on a context too short to split): one block
                config = replace(config, block_size=lc, anchor_size=lc)
            layout = BlockLayout.from_config(config, lc, size, rank)
            context = StarContext(layout, config, context_ids.shape[0], ContextKV(num_layers), group)
            rows = phase1_rows(layout, context_ids, recompute=config.anchor_source == "recompute", context_loss=False,
                               answer_from_last=False)  # an idle host: one stand-in row
            ids = rows.ids
            step = ForwardPlan(rows.positions, rows.num_rows, PrefillPass(context, num_layers), group=group, keep=[0])
        with torch.no_grad():  # the KV is what prefill is for: one row of logits, unread
            model_forward(model, ids, step)
        return context


@torch.no_grad()
def megatron_generate(model, context: StarContext, query_ids: torch.Tensor, max_new_tokens: int, *,
                      eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding by phase 2: ``query_ids [B, Lq]`` (the same on every rank) attends every rank's
    context KV, the last rank also the query's and generated tokens' KV; outputs merge by all-reduce.
    Returns ``[B, n]`` new tokens (``n <= max_new_tokens``; stops when every row has produced EOS),
    the same on every rank (the last rank's choice is broadcast, ``runtime/generate.py``)."""
    group = context.group
    with _one_step("generate", group):
        error = check_ids("query_ids", query_ids, vocab_size(model))
        if error is None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            error = f"max_new_tokens must be a positive integer, got {max_new_tokens!r}"
        if error is None and query_ids.shape[0] != context.batch_size and context.batch_size != 1:
            error = (f"query_ids has batch {query_ids.shape[0]} but the context was prefilled with batch "
                     f"{context.batch_size}; pass one query per context sequence, or prefill one context (batch 1)")
        agree_or_raise(group, "generate", {"ids": None if error else fingerprint(query_ids), "new": max_new_tokens}, error)
        size, rank = group_size(group)
        num_layers = model.config.num_layers
        lc, lq = context.context_len, query_ids.shape[1]
        holds = rank == size - 1
        state = QueryPass(context, num_layers, QueryKV(num_layers, lq + max_new_tokens) if holds else None)
        start = [lc]  # the next position

        def forward(step: int, ids: torch.Tensor) -> torch.Tensor | None:
            plan = ForwardPlan(torch.arange(start[0], start[0] + ids.shape[1]), 0, query=state, group=group,
                               keep=[ids.shape[1] - 1])
            logits = model_forward(model, ids, plan)[:, -1]
            state.check = False
            start[0] += ids.shape[1]
            return logits if holds else None

        tokens, _ = decode_tokens(forward, query_ids, max_new_tokens, holds=holds, group=group, src=size - 1,
                                  device=model_device(model), sampling=SamplingConfig(), stop=StopRule.make(eos_token_id),
                                  timeout_s=context.config.collective_timeout_s)
        return tokens
