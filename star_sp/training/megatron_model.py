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
from dataclasses import asdict, dataclass, fields

import torch

from ..config import ANCHOR_SOURCES, BACKENDS, StarConfig
from ..errors import StarInputError
from ..runconfig import load_config
from .settings import _choice, _help, _integer, _number, _pair

DTYPES = ("auto", "float32", "bfloat16")
MODEL_KEYS = ("tokenizer", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "max_position_embeddings", "rotary_base", "norm_epsilon", "tie_embeddings", "init_method_std")
# keys of the generate mode: not part of a training run's identity (a resumed run may change them)
GENERATE_KEYS = ("generate", "checkpoint", "context_file", "query", "max_new_tokens")
RESUMABLE = ("steps", "save_every", "keep_last", "resume", "log_every", "wandb", "quiet", "num_workers",
             "collective_timeout_s", "out", *GENERATE_KEYS)


@dataclass(kw_only=True)
class MegatronConfig:
    """One run of ``launch/megatron_gpt.py``: training (one sample per micro-batch and CP group, as the
    fine-tuning job) or, with ``generate``, an answer from a checkpoint."""

    # -- the model (a generate run takes them from the checkpoint) -------------------------------------
    tokenizer: str = _help("tokenizer directory (transformers layout) or 'reference' (the shipped model's, "
                           "4096 tokens); its vocabulary is the model's", "reference")
    num_layers: int = _help("transformer layers", 2)
    hidden_size: int = _help("hidden size", 64)
    num_attention_heads: int = _help("query heads", 4)
    num_query_groups: int = _help("key/value heads (grouped-query attention; divides the query heads)", 2)
    ffn_hidden_size: int = _help("SwiGLU feed-forward size", 128)
    max_position_embeddings: int = _help("the longest sequence the model is meant for (RoPE)", 65536)
    rotary_base: int = _help("RoPE base (theta)", 10000)
    norm_epsilon: float = _help("RMSNorm epsilon", 1e-6)
    tie_embeddings: bool = _help("share the input embedding and the output layer", True)
    init_method_std: float = _help("standard deviation of the initial weights", 0.02)
    out: str = _help("output folder: checkpoint-NNNNNNN/ folders, train_log.jsonl, wandb/", "runs/megatron")

    # -- parallelism and attention (the flags --attention and --star-* are add_star_args') -------------
    context_parallel_size: int = _help("ranks per context-parallel group = Star group (consecutive ranks); the "
                                       "world size must be a multiple; the groups are data-parallel to each other", 1)
    attention: str = _help("star (phase 1 per CP rank, phase 2 across the group), global (exact, one block) or "
                           "ring (exact ring attention over the CP group)", "star")
    star_block_size: int | None = _help("block size for every sample (tokens); unset: drawn per sample (blocks)")
    star_anchor_size: int | None = _help("anchor size (tokens, 0: none); unset: the block with star_block_size, "
                                         "else drawn per sample (anchor_fraction)")
    star_anchor_source: str = _help("broadcast or recompute (see star-sp generate --help)", "broadcast")
    dtype: str = _help("auto: bfloat16 on CUDA (float32 master weights), float32 on CPU", "auto")
    device: str = _help("auto (CUDA if present, one GPU per process), cpu or cuda", "auto")
    backend: str = _help("attention kernel: auto, cpu, flash, cudnn, efficient, math", "auto")
    collective_timeout_s: float = _help("seconds a collective may wait before every rank stops with an error", 600.0)

    # -- optimization (as launch/finetune.py) ----------------------------------------------------------
    steps: int = _help("optimizer steps in the whole run (a resumed run continues up to it)", 100)
    gradient_accumulation_steps: int = _help("micro-batches (one sample each) per optimizer step and CP group", 1)
    lr: float = _help("peak learning rate (AdamW)", 1e-3)
    warmup_steps: int = _help("steps of linear warm-up from 0 to lr", 0)
    min_lr_ratio: float = _help("the cosine decay ends at lr x this after the last step", 0.1)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    adam_betas: list = _help("AdamW betas", default_factory=lambda: [0.9, 0.95])
    adam_eps: float = _help("AdamW epsilon", 1e-8)
    max_grad_norm: float = _help("clip the gradient's global norm to this (0: no clipping)", 1.0)
    context_loss_weight: float = _help("weight of the mean next-token loss on context tokens beside the mean "
                                       "loss on answer tokens", 0.1)

    # -- data (star_sp.training.data, as launch/finetune.py) ------------------------------------------
    data: str = _help("'tasks' (the RULER-style generators) or a JSONL file of {context, query, answer} records",
                      "tasks")
    tasks: list = _help("task data: tasks or families (see star-sp eval), or all", default_factory=lambda: ["all"])
    lengths: list = _help("task data: [shortest, longest] sample length in tokens, drawn per sample",
                          default_factory=lambda: [1024, 4096])
    blocks: list = _help("[fewest, most] blocks the context is cut into, drawn per sample",
                         default_factory=lambda: [2, 8])
    anchor_fraction: list = _help("[least, most] anchor size as a fraction of the block, drawn per sample",
                                  default_factory=lambda: [0.25, 1.0])
    seed: int = _help("seed of the data and of the initial weights", 0)
    num_workers: int = _help("background processes that generate samples (0: in the training process)", 0)

    # -- checkpoints and logging ---------------------------------------------------------------------
    save_every: int = _help("save a checkpoint every N steps (0: only at the end)", 0)
    keep_last: int = _help("checkpoints to keep (older ones are deleted; 0 keeps all)", 2)
    resume: bool = _help("continue from the last complete checkpoint in out, if there is one", True)
    log_every: int = _help("steps between log lines (train_log.jsonl, W&B)", 1)
    wandb: str = _help("W&B project to log to (offline without an API key); empty: no W&B", "")
    quiet: bool = _help("no progress bar", False)

    # -- generate ------------------------------------------------------------------------------------
    generate: bool = _help("answer --query over the text of --context-file with a checkpoint (prefill by phase "
                           "1, then phase-2 decoding) instead of training; rank 0 prints the answer", False)
    checkpoint: str = _help("generate: checkpoint folder; empty: the last complete one in out", "")
    context_file: str = _help("generate: the long context, a UTF-8 text file", "")
    query: str = _help("generate: the question asked after the context", "")
    max_new_tokens: int = _help("generate: most tokens to write (stops at EOS)", 32)

    def __post_init__(self) -> None:
        for name in ("attention", "dtype", "star_anchor_source", "backend"):
            _choice(name, getattr(self, name), {"attention": ("star", "global", "ring"), "dtype": DTYPES,
                                                "star_anchor_source": ANCHOR_SOURCES, "backend": BACKENDS}[name])
        if self.device not in ("auto", "cpu", "cuda"):
            raise StarInputError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "max_position_embeddings", "rotary_base", "context_parallel_size", "steps",
                     "gradient_accumulation_steps", "log_every", "max_new_tokens"):
            _integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "save_every", "keep_last", "num_workers"):
            _integer(name, getattr(self, name), 0)
        _integer("seed", self.seed, None)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_query_groups:
            raise StarInputError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                                 f"({self.hidden_size}) and be a multiple of num_query_groups "
                                 f"({self.num_query_groups})")
        for name in ("lr", "collective_timeout_s", "adam_eps", "norm_epsilon", "init_method_std"):
            _number(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "max_grad_norm", "context_loss_weight", "min_lr_ratio"):
            _number(name, getattr(self, name))
        if self.min_lr_ratio > 1 or not all(0 <= b < 1 for b in _pair("adam_betas", self.adam_betas, float)):
            raise StarInputError(f"min_lr_ratio must lie in [0, 1] and adam_betas in [0, 1), got {self.min_lr_ratio!r}"
                                 f" and {self.adam_betas!r}")
        if _pair("lengths", self.lengths, int)[0] < 1 or _pair("blocks", self.blocks, int)[0] < 1:
            raise StarInputError(f"lengths and blocks must be at least 1, got {self.lengths!r} and {self.blocks!r}")
        lo, hi = _pair("anchor_fraction", self.anchor_fraction, float)
        if lo < 0 or hi > 1:
            raise StarInputError(f"anchor_fraction must lie in [0, 1] (a fraction of the block), got "
                                 f"{self.anchor_fraction!r}")
        for name in ("tokenizer", "data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise StarInputError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.tasks, list) or not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise StarInputError(f"tasks must be a list of task or family names (or ['all']), got {self.tasks!r}")
        for name in ("tie_embeddings", "resume", "quiet", "generate"):
            if not isinstance(getattr(self, name), bool):
                raise StarInputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.star_block_size is not None:
            from ..integrations.megatron_args import star_config_from_args

            star_config_from_args(self.flags())  # one line for block 0, anchor > block
        elif self.star_anchor_size is not None:
            _integer("--star-anchor-size", self.star_anchor_size, 0)
        if self.generate and not (self.context_file and self.query):
            raise StarInputError("generate needs --context-file FILE (the long context) and --query TEXT")

    def flags(self) -> argparse.Namespace:
        """The Star settings as ``integrations.megatron_args`` reads Megatron-LM's parsed flags."""
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> "MegatronConfig":
        return load_config(cls, path, overrides)


def field_names() -> list[str]:
    return [f.name for f in fields(MegatronConfig)]


@contextlib.contextmanager
def quiet_megatron():
    """Megatron-core's notes that concern none of this job off: no TransformerEngine or Apex (the local
    spec and torch's AdamW are what it uses), CUDA-graph scopes (it captures none)."""
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

    from ..integrations.megatron import star_layer_spec, use_star_positions

    config = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size, normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_method_std, use_cpu_initialization=True,
        params_dtype=torch.float32, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False)
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
