"""The configuration of the training jobs: a TOML file, then flags on top.

``TrainSettings`` holds the keys both jobs have (the device, the optimization, the data, checkpoints and
logging); ``FinetuneConfig`` adds the fine-tuning job's (``launch/finetune.py``), ``MegatronConfig``
(``megatron_model.py``) the Megatron-core job's. Every key is a field; its ``help`` text is both the
documentation and the ``--help`` line of the flag that overrides it (``--sp-size`` for ``sp_size``).
Every bad value raises ``StarInputError`` naming the key, the value and the fix.
``configs/finetune-*.toml`` and ``configs/megatron-*.toml`` are examples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ...config import ANCHOR_SOURCES, BACKENDS, TRAIN_ATTENTIONS, TRAIN_DTYPES
from ...errors import StarInputError
from ..runconfig import load_config


def field_help(text: str, default=None, **kw):
    if "default_factory" not in kw:
        kw["default"] = default
    return field(metadata={"help": text}, **kw)


@dataclass(kw_only=True)
class TrainSettings:
    """The keys both training jobs have, and their checks. A job's config is
    ``class JobConfig(TrainSettings, _JobKeys)``: ``_JobKeys`` a dataclass of the job's leading keys
    (the model, the parallelism). A dataclass takes its bases' fields in reverse method-resolution
    order, so ``fields()``, ``to_dict()`` and ``--help`` list the job's leading keys, then these, then
    the job's own fields. A job with another default overrides the field with ``redefault``, which
    keeps its place and its help."""

    dtype: str = field_help("auto: bfloat16 on CUDA (float32 master weights), float32 on CPU", "auto")
    device: str = field_help("auto (CUDA if present, one GPU per process), cpu or cuda", "auto")
    backend: str = field_help("attention kernel: auto, cpu, flash, cudnn, efficient, math", "auto")
    collective_timeout_s: float = field_help("seconds a collective may wait before every rank stops with an error", 600.0)

    # -- optimization --------------------------------------------------------------------------------
    steps: int = field_help("optimizer steps in the whole run (a resumed run continues up to it)", 100)
    gradient_accumulation_steps: int = field_help("micro-batches (one sample each) per optimizer step and group (the "
                                             "ranks that share a sample)", 1)
    lr: float = field_help("peak learning rate (AdamW)", 1e-4)
    warmup_steps: int = field_help("steps of linear warm-up from 0 to lr", 0)
    min_lr_ratio: float = field_help("the cosine decay ends at lr x this after the last step", 0.1)
    weight_decay: float = field_help("AdamW weight decay", 0.0)
    adam_betas: list = field_help("AdamW betas", default_factory=lambda: [0.9, 0.95])
    adam_eps: float = field_help("AdamW epsilon", 1e-8)
    max_grad_norm: float = field_help("clip the gradient's global norm to this (0: no clipping)", 1.0)
    context_loss_weight: float = field_help("weight of the mean next-token loss on context tokens beside the mean "
                                       "loss on answer tokens", 0.0)
    loss_chunk_tokens: int = field_help("the loss computes the logits of this many rows at a time, recomputed in the "
                                        "backward pass (0: all at once)", 4096)
    offload_activations: bool = field_help("with recomputation (gradient_checkpointing, Megatron's recompute): keep what "
                                           "each recomputed region keeps (a layer's input; selective: the core "
                                           "attention's q, k, v) in pinned host memory until the backward pass needs "
                                           "it", False)
    offload_layers: int = field_help("with offload_activations: offload only the first N recomputed layers' inputs, "
                                     "the others stay on the device (0: every layer's)", 0)

    # -- data (data.py) ------------------------------------------------------------------------------
    data: str = field_help("'tasks' (the RULER-style generators, answers as targets) or a JSONL file of "
                      "{context, query, answer} records", "tasks")
    tasks: list = field_help("task data: tasks or families (see star-sp eval), or all", default_factory=lambda: ["all"])
    lengths: list = field_help("task data: [shortest, longest] sample length in tokens, drawn per sample",
                          default_factory=lambda: [1024, 4096])
    blocks: list = field_help("[fewest, most] blocks the context is cut into, drawn per sample (block size = "
                         "context length / blocks, rounded up)", default_factory=lambda: [2, 8])
    anchor_fraction: list = field_help("[least, most] anchor size as a fraction of the block size, drawn per sample "
                                  "(0: no anchor)", default_factory=lambda: [0.25, 1.0])
    seed: int = field_help("seed of the data and of the run (a new model's weights); training samples use seeds "
                      "evaluation never uses", 0)
    prompt: str = field_help("chat: each sample as one user turn of the tokenizer's chat template, as star-sp eval "
                             "--prompt chat asks it; plain: the text as is; auto: chat where the tokenizer has a "
                             "template", "auto")
    num_workers: int = field_help("background processes that generate samples (0: in the training process)", 0)

    # -- checkpoints and logging ---------------------------------------------------------------------
    save_every: int = field_help("save a checkpoint every N steps (0: only at the end)", 0)
    keep_last: int = field_help("checkpoints to keep (older ones are deleted; 0 keeps all)", 2)
    resume: bool = field_help("continue from the last complete checkpoint in out, if there is one", True)
    log_every: int = field_help("steps between log lines (train_log.jsonl, W&B)", 1)
    wandb: str = field_help("W&B project to log to (offline without an API key); empty: no W&B", "")
    quiet: bool = field_help("no progress bar", False)

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, TRAIN_DTYPES)
        check_choice("backend", self.backend, BACKENDS)
        if self.device not in ("auto", "cpu", "cuda"):
            raise StarInputError(f"device must be auto, cpu or cuda, got {self.device!r} (one GPU per process "
                                 "is picked from LOCAL_RANK)")
        for name in ("steps", "gradient_accumulation_steps", "log_every"):
            check_integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "save_every", "keep_last", "num_workers", "loss_chunk_tokens", "offload_layers"):
            check_integer(name, getattr(self, name), 0)
        check_integer("seed", self.seed, None)
        for name in ("lr", "adam_eps", "collective_timeout_s"):
            check_number(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "max_grad_norm", "context_loss_weight", "min_lr_ratio"):
            check_number(name, getattr(self, name))
        if self.min_lr_ratio > 1:
            raise StarInputError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio!r}")
        betas = check_pair("adam_betas", self.adam_betas, float)
        if not all(0 <= b < 1 for b in betas):
            raise StarInputError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if check_pair("lengths", self.lengths, int)[0] < 1:
            raise StarInputError(f"lengths must be at least 1 token, got {self.lengths!r}")
        if check_pair("blocks", self.blocks, int)[0] < 1:
            raise StarInputError(f"blocks must be at least 1 (one block: plain causal attention), got {self.blocks!r}")
        lo, hi = check_pair("anchor_fraction", self.anchor_fraction, float)
        if lo < 0 or hi > 1:
            raise StarInputError(f"anchor_fraction must lie in [0, 1] (a fraction of the block), got "
                                 f"{self.anchor_fraction!r}")
        if not isinstance(self.tasks, list) or not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise StarInputError(f"tasks must be a list of task or family names (or ['all']), got {self.tasks!r}")
        if not isinstance(self.data, str) or not self.data:
            raise StarInputError("data must be 'tasks' or the path of a JSONL file of {context, query, answer} records")
        check_booleans(self, "resume", "quiet", "offload_activations")
        check_choice("prompt", self.prompt, ("auto", "plain", "chat"))
        if self.offload_layers and not self.offload_activations:
            raise StarInputError(f"offload_layers = {self.offload_layers} applies to offload_activations; set "
                                 "offload_activations = true too (or offload_layers = 0)")

    @property
    def offload(self) -> bool | int:
        """``offload_activations`` as the losses take it: False, True (every layer) or the first N layers."""
        return (self.offload_layers or True) if self.offload_activations else False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | None, overrides: dict):
        """Values from the TOML file at ``path`` (if any), then every override that is not None."""
        return load_config(cls, path, overrides)


def redefault(name: str, default):
    """``TrainSettings``' field ``name`` (its help) with another default, for a job's subclass."""
    return field_help(TrainSettings.__dataclass_fields__[name].metadata["help"], default)


@dataclass(kw_only=True)
class _FinetuneKeys:
    """The fine-tuning job's leading keys: the model and the parallelism (see ``TrainSettings``)."""

    model: str = field_help("model directory in the transformers layout with tokenizer files, or 'reference'", "")
    out: str = field_help("output folder: checkpoint-NNNNNNN/ folders, train_log.jsonl, wandb/", "runs/finetune")
    attention: str = field_help(
        "star: the anchor pattern (phase 1 per host, phase 2 across the sequence-parallel group); global: "
        "the plain model with a causal mask over [context ; target], the control. Under global every rank "
        "of a sequence-parallel group runs the plain model on the group's sample and the group's first "
        "rank alone carries its gradient, so the same launch and data give the control", "star")
    sp_size: int = field_help("ranks per sequence-parallel group (consecutive ranks); the world size must be a "
                         "multiple of it; the groups are data-parallel to each other", 1)
    deepspeed: str = field_help("DeepSpeed config (JSON, configs/deepspeed/zero*.json) for a ZeRO stage 0-3 engine; "
                           "empty: plain PyTorch (gradients summed over the sequence-parallel group, averaged "
                           "over the data-parallel groups)", "")
    anchor_source: str = field_help("broadcast or recompute (see star-sp generate --help)", "broadcast")
    global_fraction: float = field_help("attention = star: this share of the micro-batches trains under global "
                                        "attention instead (drawn per micro-batch, the same on every rank), to keep "
                                        "the model's global attention while it learns the anchor pattern; such a "
                                        "step runs the whole sequence on every rank (plain model, no tiled MLP): "
                                        "size lengths for it", 0.0)

    # -- memory --------------------------------------------------------------------------------------
    gradient_checkpointing: bool = field_help("recompute each decoder layer in the backward pass (transformers' "
                                              "non-reentrant activation checkpointing; Star recomputes without "
                                              "collectives)", False)
    lora: dict = field_help("a [lora] table: LoRA adapters through peft, {rank, alpha, target_modules}, trained "
                            "alone and saved in peft's layout (star-sp generate --model loads base + adapter); "
                            "empty: the whole model trains", default_factory=dict)
    tiled_mlp: int = field_help("each decoder layer's MLP runs over this many rows at a time, each chunk recomputed "
                                "in the backward pass (0: untiled)", 0)


@dataclass(kw_only=True)
class FinetuneConfig(TrainSettings, _FinetuneKeys):
    """One fine-tuning run. The batch of one optimizer step is ``gradient_accumulation_steps`` samples
    per data-parallel group (``world_size / sp_size`` groups): one sample per micro-batch, because
    samples differ in length and ``star_train_loss`` takes no padding mask."""

    # -- evaluation ----------------------------------------------------------------------------------
    eval_after: bool = field_help("after training, run star-sp eval on the saved model (star against global) and "
                             "log its table and plots to W&B", False)
    eval_tasks: str = field_help("--eval-after: tasks", "niah_single_2,vt")
    eval_lengths: str = field_help("--eval-after: lengths", "4k")
    eval_samples: int = field_help("--eval-after: samples per task and length", 4)
    eval_block_size: str = field_help("--eval-after: block sizes (tokens or 1/k of the length)", "1/4,1/8")
    eval_anchor_size: str = field_help("--eval-after: anchor sizes (tokens, block, block/k or 0)", "block,block/4")

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise StarInputError("no model given: pass --model DIR (or 'reference') or set model in --config")
        check_choice("attention", self.attention, TRAIN_ATTENTIONS)
        check_choice("anchor_source", self.anchor_source, ANCHOR_SOURCES)
        check_integer("sp_size", self.sp_size, 1)
        check_number("global_fraction", self.global_fraction)
        if not 0 <= self.global_fraction <= 1:
            raise StarInputError(f"global_fraction must be a share between 0 and 1, got {self.global_fraction!r}")
        if self.global_fraction and self.attention != "star":
            raise StarInputError(f"global_fraction mixes global-attention steps into a star run; attention is "
                                 f"{self.attention!r} already: set global_fraction = 0 or attention = 'star'")
        check_integer("eval_samples", self.eval_samples, 0)
        check_integer("tiled_mlp", self.tiled_mlp, 0)
        check_lora(self.lora)
        check_booleans(self, "gradient_checkpointing")
        if self.offload_activations and not self.gradient_checkpointing:
            raise StarInputError("offload_activations offloads what gradient checkpointing keeps; set "
                                 "gradient_checkpointing = true too (or offload_activations = false)")
        super().__post_init__()
        if self.lengths[0] < 64:
            raise StarInputError(f"lengths must be at least 64 tokens (the tasks' smallest samples), got "
                                 f"{self.lengths!r}")
        check_booleans(self, "eval_after")
        if self.eval_after and self.eval_samples < 1:
            raise StarInputError(f"eval_samples must be at least 1 with eval_after, got {self.eval_samples}")

    @property
    def uses_deepspeed(self) -> bool:
        return bool(self.deepspeed)


# Keys a resumed run may change; any other difference from the checkpoint's config is refused.
RESUMABLE_CHANGES = ("steps", "save_every", "keep_last", "resume", "log_every", "wandb", "eval_after", "eval_tasks",
                     "eval_lengths", "eval_samples", "eval_block_size", "eval_anchor_size", "quiet", "num_workers",
                     "collective_timeout_s", "out")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise StarInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_integer(name: str, value, least: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        what = "an integer" if least is None else f"an integer >= {least}"
        raise StarInputError(f"{name} must be {what}, got {value!r}")


def check_number(name: str, value, positive: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise StarInputError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def check_pair(name: str, value, kind) -> tuple:
    """``[low, high]`` of ``kind`` (int or float), ``low <= high``."""
    good = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        not isinstance(v, bool) and isinstance(v, int if kind is int else (int, float)) for v in value)
    if not good or value[0] > value[1]:
        kind_name = "integers" if kind is int else "numbers"
        raise StarInputError(f"{name} must be two {kind_name} [low, high] with low <= high, got {value!r}")
    return tuple(kind(v) for v in value)


LORA_KEYS = ("rank", "alpha", "target_modules")


def check_lora(table) -> None:
    """The ``[lora]`` table: empty, or ``rank`` (an integer >= 1), ``alpha`` (a number > 0) and
    ``target_modules`` (module names, e.g. ["q_proj", "v_proj"])."""
    if not isinstance(table, dict):
        raise StarInputError(f"lora must be a table [lora] with keys {LORA_KEYS}, got {table!r}")
    if not table:
        return
    if set(table) != set(LORA_KEYS):
        raise StarInputError(f"the [lora] table needs exactly the keys {LORA_KEYS}, got {sorted(table)}")
    check_integer("lora rank", table["rank"], 1)
    check_number("lora alpha", table["alpha"], positive=True)
    modules = table["target_modules"]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise StarInputError(f"lora target_modules must be a list of module names, e.g. [\"q_proj\", \"v_proj\"], "
                             f"got {modules!r}")


def check_booleans(config, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise StarInputError(f"{name} must be true or false, got {getattr(config, name)!r}")
