"""The Megatron-core side of ``launch/megatron_gpt.py``: its settings (a TOML file, then flags), the
parallel state and the GPT model.

Process groups: ``world = dp_size * context_parallel_size`` ranks. Megatron's context-parallel (CP)
groups are Star's groups: CP group ``g`` is the ranks ``[g * cp, (g + 1) * cp)`` (Megatron's order
``tp-cp-ep-dp-pp`` with tensor and pipeline parallel size 1), which share one sample at a time; the CP
groups are data-parallel to each other (``groups.GroupLayout``'s arithmetic, the same ranks).

The model: a ``GPTModel`` of Megatron's local layer spec (RMSNorm, SwiGLU, no biases, RoPE,
grouped-query heads, no dropout) with ``StarCoreAttention`` in its core-attention slot
(``star_layer_spec``): ids ``[B, S]`` -> logits ``[B, S, V]``, ``V`` the tokenizer's vocabulary. It is
built in float32 on the CPU (``use_cpu_initialization``; Megatron's torch norms are float32 anyway)
from ``seed`` and moved to the device; the training dtype is the stepper's (bfloat16 weights with
float32 masters on CUDA).

Block and anchor sizes, per sample: neither ``star_block_size`` nor ``star_anchor_size`` set, both
drawn per sample as the fine-tuning job draws them (``blocks``, ``anchor_fraction``); ``star_block_size``
set, that block for every sample and the anchor ``star_anchor_size`` (unset: the block); only
``star_anchor_size`` set, drawn blocks and ``min(star_anchor_size, block)``. Generate: the fixed sizes
where set, else one block per CP rank (``ceil(Lc / cp)``) with the block as anchor. ``global`` and
``ring`` read no sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from dataclasses import dataclass

import torch

from ...config import ANCHOR_SOURCES, StarConfig
from ...errors import StarInputError
from .settings import TrainSettings, check_booleans, check_choice, check_integer, check_number, field_help, redefault

MODEL_KEYS = ("tokenizer", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "max_position_embeddings", "rotary_base", "norm_epsilon", "tie_embeddings", "init_method_std")
# keys of the generate mode: not part of a training run's identity (a resumed run may change them)
RECOMPUTE_CHOICES = ("none", "full", "selective")
RECOMPUTE_SETTINGS = {  # the job's recompute key as Megatron's TransformerConfig takes it
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}
GENERATE_KEYS = ("generate", "checkpoint", "context_file", "query", "max_new_tokens")


@dataclass(kw_only=True)
class _MegatronKeys:
    """The Megatron-core job's leading keys: the model and the parallelism (see ``TrainSettings``)."""

    # -- the model (a generate run takes them from the checkpoint) -------------------------------------
    tokenizer: str = field_help("tokenizer directory (transformers layout) or 'reference' (the shipped model's, "
                           "4096 tokens); its vocabulary is the model's", "reference")
    num_layers: int = field_help("transformer layers", 2)
    hidden_size: int = field_help("hidden size", 64)
    num_attention_heads: int = field_help("query heads", 4)
    num_query_groups: int = field_help("key/value heads (grouped-query attention; divides the query heads)", 2)
    ffn_hidden_size: int = field_help("SwiGLU feed-forward size", 128)
    max_position_embeddings: int = field_help("the longest sequence the model is meant for (RoPE)", 65536)
    rotary_base: int = field_help("RoPE base (theta)", 10000)
    norm_epsilon: float = field_help("RMSNorm epsilon", 1e-6)
    tie_embeddings: bool = field_help("share the input embedding and the output layer", True)
    init_method_std: float = field_help("standard deviation of the initial weights", 0.02)
    out: str = field_help("output folder: checkpoint-NNNNNNN/ folders, train_log.jsonl, wandb/", "runs/megatron")

    # -- parallelism and attention (the flags --attention and --star-* are add_star_args') -------------
    context_parallel_size: int = field_help("ranks per context-parallel group = Star group (consecutive ranks); the "
                                       "world size must be a multiple; the groups are data-parallel to each other", 1)
    attention: str = field_help("star (phase 1 per CP rank, phase 2 across the group), global (exact, one block) or "
                           "ring (exact ring attention over the CP group)", "star")
    star_block_size: int | None = field_help("block size for every sample (tokens); unset: drawn per sample (blocks)")
    star_anchor_size: int | None = field_help("anchor size (tokens, 0: none); unset: the block with star_block_size, "
                                         "else drawn per sample (anchor_fraction)")
    star_anchor_source: str = field_help("broadcast or recompute (see star-sp generate --help)", "broadcast")
    recompute: str = field_help("activation recomputation (Megatron's recompute_granularity): none, full (every layer "
                                "recomputed in the backward pass) or selective (its core attention); Star recomputes "
                                "without collectives", "none")


@dataclass(kw_only=True)
class MegatronConfig(TrainSettings, _MegatronKeys):
    """One run of ``launch/megatron_gpt.py``: training (one sample per micro-batch and CP group, as the
    fine-tuning job) or, with ``generate``, an answer from a checkpoint."""

    lr: float = redefault("lr", 1e-3)
    context_loss_weight: float = redefault("context_loss_weight", 0.1)

    # -- generate ------------------------------------------------------------------------------------
    generate: bool = field_help("answer --query over the text of --context-file with a checkpoint (prefill by phase "
                           "1, then phase-2 decoding) instead of training; rank 0 prints the answer", False)
    checkpoint: str = field_help("generate: checkpoint folder; empty: the last complete one in out", "")
    context_file: str = field_help("generate: the long context, a UTF-8 text file", "")
    query: str = field_help("generate: the question asked after the context", "")
    max_new_tokens: int = field_help("generate: most tokens to write (stops at EOS)", 32)

    def __post_init__(self) -> None:
        check_choice("attention", self.attention, ("star", "global", "ring"))
        check_choice("star_anchor_source", self.star_anchor_source, ANCHOR_SOURCES)
        check_choice("recompute", self.recompute, RECOMPUTE_CHOICES)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "max_position_embeddings", "rotary_base", "context_parallel_size", "max_new_tokens"):
            check_integer(name, getattr(self, name), 1)
        super().__post_init__()
        if self.offload_activations and self.recompute == "none":
            raise StarInputError("offload_activations offloads what recomputation keeps; set recompute = 'full' (or "
                                 "'selective') too, or offload_activations = false")
        if self.recompute != "none" and self.attention == "ring":
            raise StarInputError("attention = 'ring' does not recompute (its recomputation would repeat the ring's "
                                 "collectives); set recompute = 'none' for ring")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_query_groups:
            raise StarInputError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                                 f"({self.hidden_size}) and be a multiple of num_query_groups "
                                 f"({self.num_query_groups})")
        for name in ("norm_epsilon", "init_method_std"):
            check_number(name, getattr(self, name), positive=True)
        for name in ("tokenizer", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise StarInputError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        check_booleans(self, "tie_embeddings", "generate")
        if self.star_block_size is not None:
            from ...integrations.megatron.args import star_config_from_args

            star_config_from_args(self.flags())  # one line for block 0, anchor > block
        elif self.star_anchor_size is not None:
            check_integer("--star-anchor-size", self.star_anchor_size, 0)
        if self.generate and not (self.context_file and self.query):
            raise StarInputError("generate needs --context-file FILE (the long context) and --query TEXT")

    def flags(self) -> argparse.Namespace:
        """The Star settings as ``integrations.megatron.args`` reads Megatron-LM's parsed flags."""
        return argparse.Namespace(attention=self.attention, star_block_size=self.star_block_size,
                                  star_anchor_size=self.star_anchor_size, star_anchor_source=self.star_anchor_source,
                                  context_parallel_size=self.context_parallel_size)

    def star_config(self, context_len: int, block: int | None = None, anchor: int | None = None) -> StarConfig:
        """The sizes of one context: the fixed ones where set, else ``block`` and ``anchor`` (the sample's
        drawn sizes; for generate, one block per CP rank and the block as anchor)."""
        if block is None:
            block = max(1, -(-context_len // self.context_parallel_size))
        block = self.star_block_size or block
        if self.star_anchor_size is not None:
            anchor = min(self.star_anchor_size, block)
        elif self.star_block_size is not None or anchor is None:
            anchor = block
        return StarConfig(block_size=block, anchor_size=anchor, anchor_source=self.star_anchor_source,
                          backend=self.backend, collective_timeout_s=self.collective_timeout_s)


@contextlib.contextmanager
def quiet_megatron():
    """Megatron-core's warnings that do not concern this job, silenced while inside: TransformerEngine or
    Apex not installed (the job uses the local spec and torch's AdamW) and the deprecated CUDA-graph
    scope (it captures no graph)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        yield


def init_parallel(cp: int, timeout_s: float):
    """Megatron's parallel state with context-parallel size ``cp`` over the default group (every rank):
    ``(cp_group, dp_group)``, each None when it has one rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp,
                                             distributed_timeout_minutes=max(1, round(timeout_s / 60)))
    cp_group = parallel_state.get_context_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    size = lambda g: dist.get_world_size(g)  # noqa: E731
    return (cp_group if size(cp_group) > 1 else None), (dp_group if size(dp_group) > 1 else None)


def close_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def build_model(cfg: MegatronConfig, vocab: int, device: torch.device, seed: int = 0):
    """The float32 ``GPTModel`` with Star's core attention (``cfg.attention``) on ``device``; the same
    weights on every rank (from ``seed``)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ...integrations.megatron import star_layer_spec, use_star_positions

    config = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size, normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_method_std, use_cpu_initialization=True,
        params_dtype=torch.float32, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        **RECOMPUTE_SETTINGS[cfg.recompute])
    # the spec's StarConfig is read only by Megatron's own loop; this job's steps bring each sample's
    spec = star_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"),
                           cfg.star_config(cfg.max_position_embeddings), cfg.attention)
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                     max_sequence_length=cfg.max_position_embeddings, position_embedding_type="rope",
                     rotary_base=cfg.rotary_base, share_embeddings_and_output_weights=cfg.tie_embeddings)
    model = model.to(device=device, dtype=torch.float32)  # the torch norms are made in float32 already
    use_star_positions(model)
    return model


__all__ = ["GENERATE_KEYS", "MODEL_KEYS", "MegatronConfig", "build_model", "close_parallel", "init_parallel",
           "quiet_megatron"]
