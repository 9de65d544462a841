"""Star Attention in Megatron-core GPT models: a core-attention module over the context-parallel group.

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from star_sp import StarConfig
    from star_sp.integrations.megatron import star_layer_spec, use_star_positions

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

from ...config import ATTENTIONS, StarConfig
from ...errors import StarInputError
from ...layout import BlockLayout
from ...runtime.kv_cache import ContextKV
from ...runtime.passes import PrefillPass, QueryPass, StarContext


def require_megatron():
    """The ``megatron.core`` package, or one line saying how to install it."""
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        raise StarInputError("Megatron-core is not installed: pip install 'star-sp[megatron]' (megatron-core "
                             ">= 0.16)") from None
    import megatron.core as mc

    return mc


# -- the plan: what the rows of one forward are ------------------------------------------------------

@dataclass
class ForwardPlan:
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


_PLAN: contextvars.ContextVar[ForwardPlan | None] = contextvars.ContextVar("star_sp_megatron_plan", default=None)


def current_plan() -> ForwardPlan | None:
    """The plan of the forward running now (``running``), or None in Megatron's own loop."""
    return _PLAN.get()


@contextlib.contextmanager
def running(step: ForwardPlan):
    """Run the model's forward inside: its Star modules and RoPE read ``step``."""
    token = _PLAN.set(step)
    try:
        yield step
    finally:
        _PLAN.reset(token)


def contiguous_share(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This CP rank's contiguous share of ``x`` along ``dim`` (tokens, labels, loss mask of a batch for
    Megatron's own training loop): rank ``r`` of ``N`` gets ``[r * L / N, (r + 1) * L / N)``. Star's
    blocks are contiguous runs, so this replaces Megatron's zigzag ``get_batch_on_this_cp_rank``."""
    size, rank = group_size(group)
    length = x.shape[dim]
    if length % size:
        raise StarInputError(f"a sequence of {length} tokens does not split evenly over {size} context-parallel "
                             f"ranks; use a sequence length divisible by {size}")
    share = length // size
    return x.narrow(dim, rank * share, share)


def group_size(group) -> tuple[int, int]:
    """``(size, rank)`` of ``group``; ``(1, 0)`` for None (one process)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


# -- the core-attention module -----------------------------------------------------------------------

class StarCoreAttention(torch.nn.Module):
    """Megatron's core-attention slot, parameter-free. Built by Megatron with ``config, layer_number,
    attn_mask_type, attention_type, cp_comm_type, softmax_scale, pg_collection`` and the spec's
    ``star`` (a ``StarConfig``, required: ``star_layer_spec`` puts it there) and ``attention`` (``star``,
    ``global`` or ``ring``).

    ``forward(query [sq, b, np, hn], key, value [sq, b, ng, hn], attention_mask, ...)`` returns
    ``[sq, b, np * hn]``; grouped-query heads are not expanded (the kernels read them as they are). The
    keys are the rows' own: Megatron's KV-cached inference, which passes the cached keys too, is refused
    (``megatron_prefill`` and ``megatron_generate`` keep Star's KV themselves)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale: float | None = None, pg_collection=None, *,
                 star: StarConfig | None = None, attention: str = "star", **_unused):
        super().__init__()
        if not isinstance(star, StarConfig):
            raise StarInputError(f"StarCoreAttention needs the layer spec's star config, a StarConfig (got "
                                 f"{type(star).__name__}): build the spec with star_layer_spec(spec, StarConfig(...))")
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
        self.star = star
        self.attention = attention
        self.star_positions = False  # set by use_star_positions(model) on the model that holds this module
        self.recompute = getattr(config, "recompute_granularity", None)
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
        if key.shape[0] != query.shape[0]:
            raise StarInputError(f"StarCoreAttention got {key.shape[0]} keys for {query.shape[0]} query rows: "
                                 "Megatron's KV-cached inference (inference_context) is not supported; generate with "
                                 "star_sp.integrations.megatron.megatron_prefill and megatron_generate")
        step = _PLAN.get()
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

    def _context_only(self, query) -> ForwardPlan:
        """Megatron's own loop: the rows are this CP rank's contiguous share of the context. Every check
        here depends on nothing rank-specific, so every rank refuses alike."""
        size, rank = group_size(self.cp_group)
        rows = query.shape[0]
        config = self.star
        if size > 1:
            advice = "or train through star_sp.training.megatron_loss.megatron_train_loss"
            if self.attention != "star":
                raise StarInputError(f"attention={self.attention!r} in Megatron's own loop needs context parallel size "
                                     f"1 (here {size}): its batches are split contiguously; use attention='star', "
                                     + advice)
            if not self.star_positions:
                raise StarInputError("Megatron's own loop at context parallel size > 1 needs use_star_positions(model) "
                                     "(RoPE at each rank's contiguous positions; Megatron's own is zigzag) and the "
                                     "batch split by contiguous_share, " + advice)
            if self.recompute and self.training:  # Megatron recomputes in training mode only
                raise StarInputError("Megatron's own loop at context parallel size > 1 does not take recompute_granularity "
                                     "(its reentrant checkpoint would repeat phase 1's anchor broadcast in the backward "
                                     "pass); set recompute_granularity to None, " + advice + ", which recomputes")
            if config.anchor_source == "recompute":
                raise StarInputError("Megatron's own loop takes anchor_source='broadcast' (its rows are the rank's "
                                     "own tokens, with no room for the anchor's), " + advice)
            if rows % config.block_size:
                raise StarInputError(f"Megatron's own batches give each of the {size} CP ranks {rows} rows, which must be "
                                     f"whole blocks: choose a block size that divides {rows} (got {config.block_size})")
        elif self.attention != "star":
            config = replace(config, block_size=rows, anchor_size=rows)  # one process: causal attention
        layout = BlockLayout.from_config(config, rows * size, size, rank)
        assert layout.token_range == (rank * rows, (rank + 1) * rows), (layout.token_range, rows)
        context = StarContext(layout, config, query.shape[1], ContextKV(self.num_layers), self.cp_group)
        return ForwardPlan(layout.positions(device=query.device), rows, PrefillPass(context, self.num_layers,
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
