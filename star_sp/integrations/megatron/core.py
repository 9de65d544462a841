"""Star Attention in Megatron-core GPT models: a core-attention module over the context-parallel group.

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from ... import StarConfig
    from .core import star_layer_spec, use_star_positions

    star = StarConfig(block_size=4096, anchor_size=1024)
    model = GPTModel(config, transformer_layer_spec=star_layer_spec(get_gpt_layer_local_spec(), star), ...,
                     position_embedding_type="rope")
    use_star_positions(model)          # RoPE at each row's own position (contiguous blocks, not zigzag)

The context-parallel (CP) group is Star's group: CP rank ``r`` holds a contiguous run of the context's
blocks (``BlockLayout``), the last rank the final block and the query. Training goes through
``star_sp.training.megatron_loss.megatron_train_loss``, inference through ``megatron_prefill`` and
``megatron_generate`` below; each runs the model inside a *step* that tells the module which rows of
its input are phase-1 rows (this rank's context, ``[anchor ;] own blocks``) and which are phase-2 rows
(the target or query tokens, the same on every rank), and at which positions they sit::

    module input  [sq, b, np, hn]   rows  [ phase-1 rows | phase-2 rows ]
                                            PrefillPass    QueryPass        (runtime/passes.py)

Megatron's own training loop (no step: a batch Megatron split itself) works too, for language
modelling over the context alone: each CP rank's ``sq`` rows are then its contiguous share of a context
of ``sq * cp`` tokens (phase 1 only), which needs ``block_size`` to divide ``sq`` and the batch split
contiguously (``contiguous_share``), not Megatron's zigzag ``get_batch_on_this_cp_rank``.

The module never reads ``attention_mask`` or ``attn_mask_type``: the pattern comes from the layout
(after prefill Megatron passes ``no_mask`` even for multi-token chunks, which a module trusting it
would get wrong). ``attention="ring"`` is exact ring attention over the same group, for comparison.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ...config import StarConfig
from ...distributed.agreement import agree_or_raise
from ...runtime.kv_cache import ContextKV, QueryKV
from ...runtime.passes import PrefillPass, QueryPass, RingPrefillPass, StarContext
from ...distributed.rows import phase1_rows
from ...errors import StarInputError
from ...layout import BlockLayout, RingLayout

ATTENTIONS = ("star", "global", "ring")


def require_megatron():
    """The ``megatron.core`` package, or one line saying how to install it."""
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        raise StarInputError("Megatron-core is not installed: pip install 'star-sp[megatron]' (megatron-core "
                             ">= 0.16)") from None
    import megatron.core as mc

    return mc


# -- the step: what the rows of one forward are ------------------------------------------------------

@dataclass
class Step:
    """One model forward under Star: ``positions [rows]`` (RoPE), ``prefill`` for the first
    ``context_rows`` rows (a ``PrefillPass`` or ``RingPrefillPass``, or None), ``query`` (a
    ``QueryPass``) for the rest."""

    positions: torch.Tensor
    context_rows: int
    prefill: object | None = None
    query: QueryPass | None = None
    group: "dist.ProcessGroup | None" = None
    keep: list[int] | None = None
    """Rows whose logits the caller reads (None: every row); the output layer runs on these alone."""


_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar("star_sp_megatron_step", default=None)
_ROPE_USED = [False]  # StarRotary ran in this forward (Megatron's own loop checks it at its first layer)


@contextlib.contextmanager
def running(step: Step):
    """Run the model's forward inside: its Star modules and RoPE read ``step``."""
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


def contiguous_share(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This CP rank's contiguous share of ``x`` along ``dim`` (tokens, labels, loss mask of a batch for
    Megatron's own training loop): rank ``r`` of ``N`` gets ``[r * L / N, (r + 1) * L / N)``. Star's
    blocks are contiguous runs, so this replaces Megatron's zigzag ``get_batch_on_this_cp_rank``."""
    size, rank = _group_size(group)
    length = x.shape[dim]
    if length % size:
        raise StarInputError(f"a sequence of {length} tokens does not split evenly over {size} context-parallel "
                             f"ranks; use a sequence length divisible by {size}")
    share = length // size
    return x.narrow(dim, rank * share, share)


def _group_size(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# -- the core-attention module -----------------------------------------------------------------------

class StarCoreAttention(torch.nn.Module):
    """Megatron's core-attention slot, parameter-free. Built by Megatron with ``config, layer_number,
    attn_mask_type, attention_type, cp_comm_type, softmax_scale, pg_collection`` and the spec's
    ``star`` (a ``StarConfig``) and ``attention`` (``star``, ``global`` or ``ring``).

    ``forward(query [sq, b, np, hn], key, value [sk, b, ng, hn], attention_mask, ...)`` returns
    ``[sq, b, np * hn]``; grouped-query heads are not expanded (the kernels read them as they are)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale: float | None = None, pg_collection=None, *,
                 star: StarConfig | None = None, attention: str = "star", **_unused):
        super().__init__()
        if attention not in ATTENTIONS:
            raise StarInputError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention_type != "self":
            raise StarInputError(f"Star Attention replaces self-attention only, got attention_type {attention_type!r}")
        if getattr(config, "pipeline_model_parallel_size", 1) > 1:
            raise StarInputError("Star Attention in Megatron supports pipeline parallel size 1 only; set "
                                 "--pipeline-model-parallel-size 1")
        if getattr(config, "tensor_model_parallel_size", 1) > 1:
            raise StarInputError("Star Attention in Megatron supports tensor parallel size 1 only for now; set "
                                 "--tensor-model-parallel-size 1 and use context parallelism")
        if getattr(config, "window_size", None) is not None:
            raise StarInputError(f"sliding-window attention (window_size {config.window_size}) is not supported by "
                                 "Star Attention; use a model with full attention")
        if getattr(config, "softmax_type", "vanilla") not in (None, "vanilla"):
            raise StarInputError(f"softmax_type {config.softmax_type!r} (attention sinks) is not supported by Star "
                                 "Attention; use the vanilla softmax")
        if (getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
            raise StarInputError(f"attention dropout {config.attention_dropout} is not supported: every CP rank "
                                 "computes the target rows, and their dropout masks would differ; set it to 0")
        self.layer = layer_number - 1
        self.num_layers = config.num_layers
        self.scale = softmax_scale
        self.star = star if star is not None else StarConfig(block_size=4096, anchor_size=4096)
        self.attention = attention
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp is None:
            from megatron.core import parallel_state

            cp = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_group = cp

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise StarInputError("Star Attention takes no attention bias; use a model without one")
        if packed_seq_params is not None:
            raise StarInputError("Star Attention does not take packed sequences (THD); pass one sequence per "
                                 "batch row")
        step = _STEP.get()
        if step is None:
            step = self._context_only(query)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (B, H, S, D)
        n = step.context_rows
        outs = []
        if n:
            kc, vc = step.prefill.update(k[:, :, :n], v[:, :, :n], self.layer)
            outs.append(step.prefill.attend(self.layer, q[:, :, :n], kc, vc, self.scale))
        if n < q.shape[2]:
            kt, vt = step.query.update(k[:, :, n:], v[:, :, n:], self.layer)
            outs.append(step.query.attend(self.layer, q[:, :, n:], kt, vt, self.scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _context_only(self, query) -> Step:
        """Megatron's own loop: the rows are this CP rank's contiguous share of the context. Every check
        here depends on nothing rank-specific, so every rank refuses alike."""
        size, rank = _group_size(self.cp_group)
        rows = query.shape[0]
        config = self.star
        if size > 1:
            advice = "or train through star_sp.training.megatron_loss.megatron_train_loss"
            if self.attention != "star":
                raise StarInputError(f"attention={self.attention!r} in Megatron's own loop needs context parallel size "
                                     f"1 (here {size}): its batches are split contiguously; use attention='star', "
                                     + advice)
            if not _ROPE_USED[0]:
                raise StarInputError("Megatron's own loop at context parallel size > 1 needs use_star_positions(model) "
                                     "(RoPE at each rank's contiguous positions; Megatron's own is zigzag) and the "
                                     "batch split by contiguous_share, " + advice)
            if config.anchor_source == "recompute":
                raise StarInputError("Megatron's own loop takes anchor_source='broadcast' (its rows are the rank's "
                                     "own tokens, with no room for the anchor's), " + advice)
            if rows % config.block_size:
                raise StarInputError(f"Megatron's own batches give each of the {size} CP ranks {rows} rows, which must be "
                                     f"whole blocks: choose a block size that divides {rows} (got {config.block_size})")
        elif self.attention != "star":
            config = replace(config, block_size=rows, anchor_size=rows)  # one process: causal attention
        if self.layer == self.num_layers - 1:
            _ROPE_USED[0] = False  # the next forward's RoPE sets it again
        layout = BlockLayout.from_config(config, rows * size, size, rank)
        assert layout.token_range == (rank * rows, (rank + 1) * rows), (layout.token_range, rows)
        context = StarContext(layout, config, query.shape[1], ContextKV(self.num_layers), self.cp_group)
        return Step(layout.positions(device=query.device), rows, PrefillPass(context, self.num_layers,
                                                                             check=self.layer == 0))


def star_layer_spec(spec, config: StarConfig, attention: str = "star"):
    """A copy of a GPT layer spec (``ModuleSpec`` of a ``TransformerLayer``, local or TransformerEngine, or
    a ``TransformerBlockSubmodules`` of several) with ``StarCoreAttention`` in its core-attention slot."""
    import copy

    from megatron.core.transformer.spec_utils import ModuleSpec

    if not isinstance(config, StarConfig):
        raise StarInputError(f"config must be a star_sp.StarConfig, got {type(config).__name__}")
    if attention not in ATTENTIONS:
        raise StarInputError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    spec = copy.deepcopy(spec)
    layers = getattr(spec, "layer_specs", None) or [spec]
    for layer in layers:
        try:
            attn = layer.submodules.self_attention.submodules
            attn.core_attention  # noqa: B018 - the slot must exist
        except AttributeError:
            raise StarInputError("this layer spec has no self_attention.submodules.core_attention slot; pass "
                                 "a GPT layer spec (get_gpt_layer_local_spec() or a TransformerEngine one)") from None
        attn.core_attention = ModuleSpec(module=StarCoreAttention, params={"star": config, "attention": attention})
    return spec


# -- positions ---------------------------------------------------------------------------------------

class StarRotary(torch.nn.Module):
    """Megatron's RoPE at each row's own position: the step's positions, or, in Megatron's own loop,
    this CP rank's contiguous share (Megatron's default slices the table zigzag under CP)."""

    def __init__(self, inner, context_parallel_size: int = 1):
        super().__init__()
        self.inner = inner
        self.cp = max(1, context_parallel_size)  # Megatron's rotary length is the local rows x this

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        _ROPE_USED[0] = True
        step = _STEP.get()
        inv = self.inner.inv_freq
        if step is not None:
            positions = step.positions
        else:
            _, rank = _group_size(self.inner.cp_group)
            share = max_seq_len // self.cp
            positions = torch.arange(rank * share, (rank + 1) * share) + offset
        seq = positions.to(device=inv.device, dtype=inv.dtype)
        if self.inner.seq_len_interpolation_factor is not None:
            seq = seq / self.inner.seq_len_interpolation_factor
        freqs = torch.outer(seq, inv)
        if self.inner.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.inner.get_rotary_seq_len(*args, **kwargs)


def use_star_positions(model) -> None:
    """Replace the GPT model's RoPE with ``StarRotary`` (once; idempotent). Refuses other position
    embeddings (learned absolute ones take ``position_ids`` as they are and need nothing)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    if not hasattr(model, "decoder") or not hasattr(model, "output_layer"):
        raise StarInputError(f"expected a Megatron-core GPTModel, got {type(model).__name__}: pass the model itself "
                             "(a wrapper's .module)")
    rope = getattr(model, "rotary_pos_emb", None)
    if isinstance(rope, StarRotary) or getattr(model, "position_embedding_type", "rope") == "learned_absolute":
        return
    if type(rope) is not RotaryEmbedding:
        raise StarInputError(f"Star Attention in Megatron supports position_embedding_type 'rope' (plain "
                             f"RotaryEmbedding) or 'learned_absolute', got {type(rope).__name__}")
    model.rotary_pos_emb = StarRotary(rope, getattr(model.config, "context_parallel_size", 1))
    if rope.inv_freq.device.type == "cpu":  # Megatron moves it to CUDA at first use; follow the model
        param = next(model.parameters(), None)
        if param is not None:
            rope.inv_freq = rope.inv_freq.to(param.device)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# -- inference: prefill (phase 1) and phase-2 decoding -----------------------------------------------

def _forward(model, ids: torch.Tensor, step: Step) -> torch.Tensor:
    """The model's logits ``[B, rows, V]`` for ``ids [B, rows]`` under ``step`` (``[B, len(keep), V]``
    with ``step.keep``: the vocabulary projection runs on those rows only, as transformers'
    ``logits_to_keep`` does; at 64K rows and a 128K vocabulary the full logits are 17 GB in bf16)."""
    use_star_positions(model)
    device = model_device(model)
    with running(step), _output_rows(model, step.keep, device):
        positions = step.positions.to(device)[None].expand(ids.shape[0], -1)
        logits = model(ids.to(device), positions, None)
    if step.keep is not None and logits.shape[1] != len(step.keep):
        raise StarInputError(f"the model returned logits for {logits.shape[1]} rows, not the {len(step.keep)} asked for: "
                             "pass the GPTModel itself (not a wrapper around it)")
    return logits


@contextlib.contextmanager
def _output_rows(model, keep: list[int] | None, device):
    """While inside, the model's output layer projects only the hidden states of rows ``keep``."""
    layer = getattr(model, "output_layer", None)
    if keep is None or layer is None:
        yield
        return
    rows = torch.tensor(keep, dtype=torch.long, device=device)
    own = layer.__dict__.get("forward")  # a forward set on the instance, put back afterwards
    project = layer.forward

    def forward(hidden, *args, **kwargs):  # hidden [rows, B, H]
        return project(hidden.index_select(0, rows), *args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        if own is None:
            del layer.forward  # the class's forward again
        else:
            layer.forward = own


def _vocab(model) -> int:
    return getattr(model, "vocab_size", None) or model.config.padded_vocab_size


def megatron_prefill(model, context_ids: torch.Tensor, config: StarConfig, group=None, *,
                     attention: str = "star") -> StarContext:
    """Phase 1 on every rank of ``group`` (Megatron's CP group): this rank's blocks behind the anchor
    (``ring``: its zigzag share, exact). ``context_ids [B, Lc]``, the full ids on every rank. Returns
    the rank's ``StarContext`` (its own blocks' KV) for ``megatron_generate``."""
    from ..hf.engine import _check_ids, _fingerprint

    use_star_positions(model)
    error = _check_ids("context_ids", context_ids, _vocab(model))
    if error is None and attention not in ATTENTIONS:
        error = f"attention must be one of {ATTENTIONS}, got {attention!r}"
    if error is None and not isinstance(config, StarConfig):
        error = f"config must be a star_sp.StarConfig, got {type(config).__name__}"
    agree_or_raise(group, "prefill", {"ids": None if error else _fingerprint(context_ids), "attention": attention,
                               "config": None if error else config.to_dict()}, error)
    size, rank = _group_size(group)
    lc = context_ids.shape[1]
    num_layers = model.config.num_layers
    if attention == "ring" and size > 1 and lc >= 2 * size:
        layout = RingLayout(lc, size, rank)
        context = StarContext(layout, config, context_ids.shape[0], ContextKV(num_layers), group)
        step = Step(layout.positions(), layout.num_tokens, RingPrefillPass(context, num_layers), group=group, keep=[0])
        ids = layout.shard(context_ids, 1)
    else:
        if attention != "star":  # global (or ring on a context too short to split): one block
            config = replace(config, block_size=lc, anchor_size=lc)
        layout = BlockLayout.from_config(config, lc, size, rank)
        context = StarContext(layout, config, context_ids.shape[0], ContextKV(num_layers), group)
        rows = phase1_rows(layout, context_ids, recompute=config.anchor_source == "recompute", context_loss=False,
                           answer_from_last=False)  # an idle host: one stand-in row
        ids = rows.ids
        step = Step(rows.positions, rows.num_rows, PrefillPass(context, num_layers), group=group, keep=[0])
    with torch.no_grad():  # the KV is what prefill is for: one row of logits, unread
        _forward(model, ids, step)
    return context


@torch.no_grad()
def megatron_generate(model, context: StarContext, query_ids: torch.Tensor, max_new_tokens: int, *,
                      eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding by phase 2: ``query_ids [B, Lq]`` (the same on every rank) attends every rank's
    context KV, the last rank also the query's and generated tokens' KV; outputs merge by all-reduce.
    Returns ``[B, n]`` new tokens (``n <= max_new_tokens``; stops when every row has produced EOS),
    the same on every rank (the last rank's choice is broadcast)."""
    from ..hf.engine import _check_ids, _fingerprint

    group = context.group
    error = _check_ids("query_ids", query_ids, _vocab(model))
    if error is None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        error = f"max_new_tokens must be a positive integer, got {max_new_tokens!r}"
    if error is None and query_ids.shape[0] != context.batch_size and context.batch_size != 1:
        error = (f"query_ids has batch {query_ids.shape[0]} but the context was prefilled with batch "
                 f"{context.batch_size}; pass one query per context sequence, or prefill one context (batch 1)")
    agree_or_raise(group, "generate", {"ids": None if error else _fingerprint(query_ids), "new": max_new_tokens}, error)
    size, rank = _group_size(group)
    num_layers = model.config.num_layers
    lc, lq = context.context_len, query_ids.shape[1]
    holds = rank == size - 1
    state = QueryPass(context, num_layers, QueryKV(num_layers, lq + max_new_tokens) if holds else None)
    device = model_device(model)
    ids, start, new = query_ids.to(device), lc, []
    done = torch.zeros(query_ids.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        step = Step(torch.arange(start, start + ids.shape[1]), 0, query=state, group=group, keep=[ids.shape[1] - 1])
        logits = _forward(model, ids, step)[:, -1]
        state.check = False
        token = logits.argmax(-1)
        if group is not None:
            dist.broadcast(token, src=dist.get_global_rank(group, size - 1), group=group)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new.append(token)
        start += ids.shape[1]
        ids = token[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.stack(new, dim=1).cpu()


__all__ = ["ATTENTIONS", "StarCoreAttention", "contiguous_share", "StarRotary", "Step", "megatron_generate", "megatron_prefill",
           "require_megatron", "running", "star_layer_spec", "use_star_positions"]
