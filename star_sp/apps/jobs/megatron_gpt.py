"""The job behind ``launch/megatron_gpt.py``: a Megatron-core GPT model trained under Star Attention
(or ``global``/``ring`` attention) with context parallelism, and a ``--generate`` mode.

    torchrun --nproc_per_node N launch/megatron_gpt.py --config configs/megatron-reference.toml \
        --context-parallel-size N --attention star
    torchrun --nproc_per_node N launch/megatron_gpt.py --config ... --generate --context-file F --query Q

Per optimizer step, each CP group (``megatron_model.py``: the groups, the model, the settings): for
each of the ``gradient_accumulation_steps`` micro-batches, its sample (``data.py``, one per micro-batch
and group, the same on every rank of the group) and each rank's share of the loss
(``megatron_train_loss``: ids ``[1, Lc]`` context, ``[1, Lt]`` target and labels, the full tensors on
every rank) and its backward; then ``TorchStepper``: the gradients summed over the CP group
(``reduce_gradients``), averaged over the data-parallel groups, clipped, AdamW. Rank 0 shows a
progress bar, appends a row per ``log_every`` steps to ``OUT/train_log.jsonl`` and W&B; checkpoints go
to ``OUT/checkpoint-NNNNNNN`` (``model.pt``: the model's state dict; ``optimizer.pt``: float32 masters,
AdamW and the schedule; ``trainer_state.json`` last), and a rerun of the same command resumes. The
loop, the resume and the command line are ``job_parts.py``'s, as the fine-tuning job's.

Generate: the checkpoint's model (its shape and tokenizer from its ``trainer_state.json``), the context
file's ids ``[1, Lc]`` prefilled by phase 1 on every CP rank (``megatron_prefill``), the query answered
by phase-2 greedy decoding (``megatron_generate``); rank 0 prints the answer on stdout.

Exit codes: 0; 1 after an error (one line, on every rank); 2 for a bad flag; 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from ...errors import StarError, StarInputError
from ..report import run_on_every_rank, exit_on_interrupt, on_every_rank, report, same_everywhere
from .loop import add_config_flags, job_parser, load_from_args, open_tracker, resume_point, train_steps, training_dtype
from .megatron_model import GENERATE_KEYS, MODEL_KEYS, MegatronConfig, quiet_megatron

PROG = "star-sp megatron"
ENGINE = "megatron-core"
STAR_FLAGS = ("attention", "star_block_size", "star_anchor_size", "star_anchor_source")


def build_parser() -> argparse.ArgumentParser:
    """``--config``, Star's flags (``integrations.megatron.args.add_star_args``) and a flag per other key."""
    from ...integrations.megatron.args import add_star_args

    parser = job_parser(PROG, "Train a Megatron-core GPT model under Star Attention with context parallelism (the "
                        "CP group is the Star group; data-parallel across groups), or answer a query over a long "
                        "context with a checkpoint (--generate).", configs="configs/megatron-*.toml",
                        examples="configs/megatron-tiny-cpu.toml (CPU), configs/megatron-reference.toml (GPU)")
    add_star_args(parser)
    parser.set_defaults(attention=None, star_anchor_source=None)  # unset: the config's value
    for action in parser._actions:  # their help as this job reads them (the config's keys)
        if action.dest in STAR_FLAGS:
            action.help = MegatronConfig.__dataclass_fields__[action.dest].metadata["help"]
    add_config_flags(parser, MegatronConfig, skip=STAR_FLAGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``launch/megatron_gpt.py``."""
    with exit_on_interrupt(PROG):
        args = build_parser().parse_args(argv)
        try:
            cfg = same_everywhere(lambda: load_from_args(MegatronConfig, args))
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            shortest = cfg.lengths[0] if cfg.data == "tasks" and not cfg.generate else None
            same_everywhere(lambda: _check_star(cfg, world_size, shortest))  # before any process group
            return run(cfg)
        except StarError as exc:
            report(f"{PROG}: error: {exc}", everywhere=getattr(exc, "on_every_rank", False), prog=PROG, exiting=True)
            return 1


def _check_star(cfg: MegatronConfig, world_size: int, sequence: int | None) -> None:
    from ...integrations.megatron.args import check_star_args

    check_star_args(cfg.flags(), world_size, sequence if cfg.attention == "star" else None)


def run(cfg: MegatronConfig) -> int:
    from ...distributed.process_group import close_process_group, init_from_env
    from .megatron_model import close_parallel, init_parallel

    world, device, created = init_from_env(cfg.collective_timeout_s, cfg.device)
    if world is None:  # one process: Megatron's parallel state needs a process group all the same
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        world, created = dist.group.WORLD, True
    ok = False
    try:
        with quiet_megatron():
            cp_group, dp_group = init_parallel(cfg.context_parallel_size, cfg.collective_timeout_s)
            code = (_generate if cfg.generate else _train)(cfg, world, device, cp_group, dp_group)
        ok = code == 0
        return code
    finally:
        close_parallel()
        if created and dist.is_initialized():
            close_process_group(ok)


def _tokenizer(name: str):
    import transformers

    from ...models import SHIPPED, resolve_model

    path = resolve_model(name, weights=False) if name in SHIPPED else name
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a missing folder or unreadable files
        raise StarInputError(f"cannot load a tokenizer from {name}; pass a folder with tokenizer files or "
                             "'reference'") from None


def _broadcast(model, world) -> None:
    """Rank 0's weights on every rank."""
    if dist.get_world_size(world) > 1:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0, group=world)


class MegatronModule(torch.nn.Module):
    """``forward(sample)`` -> ``(share, info)`` for ``TorchStepper``: this rank's share of the sample's
    loss (``megatron_train_loss`` over the CP group) and its floats ``loss``, ``answer_loss``,
    ``context_loss`` (None without a context loss), the same on every rank of the group."""

    def __init__(self, model, cfg: MegatronConfig, cp_group):
        super().__init__()
        self.model, self.cfg, self.cp = model, cfg, cp_group

    def star_config(self, sample):
        return self.cfg.star_config(sample.context_ids.shape[1], sample.block_size, sample.anchor_size)

    def forward(self, sample):
        from ...ops.backends import many_shapes
        from ...training.megatron_loss import megatron_train_loss

        with many_shapes():
            loss, parts = megatron_train_loss(
                self.model, sample.context_ids, sample.target_ids, sample.labels, self.star_config(sample), self.cp,
                context_loss_weight=self.cfg.context_loss_weight, attention=self.cfg.attention, return_parts=True,
                loss_chunk_tokens=self.cfg.loss_chunk_tokens, offload_activations=self.cfg.offload)
        weight = self.cfg.context_loss_weight
        return loss, {"loss": float(loss.detach()), "answer_loss": float(parts["answer"]),
                      "context_loss": float(parts["context"]) if weight else None}


def _train(cfg: MegatronConfig, world, device, cp_group, dp_group) -> int:
    from .data import open_data
    from .groups import GroupLayout, TrainGroups
    from .megatron_model import build_model
    from .steppers import TorchStepper

    layout = GroupLayout(dist.get_world_size(world), dist.get_rank(world), cfg.context_parallel_size)
    groups = TrainGroups(layout, world, cp_group, dp_group)
    rank, dtype = layout.rank, training_dtype(cfg, device)
    tokenizer = run_on_every_rank(world, "tokenizer", lambda: _tokenizer(cfg.tokenizer))
    data = run_on_every_rank(world, "data", lambda: open_data(cfg, tokenizer, layout.dp_size))
    if cfg.data != "tasks" and cfg.attention == "star" and cfg.context_parallel_size > 1:  # the tasks': in main
        shortest = min(len(ids) for ids in tokenizer([r["context"] for r in data.records])["input_ids"])
        same_everywhere(lambda: _check_star(cfg, layout.world_size, shortest))
    if cfg.data == "tasks" and tokenizer.eos_token_id is None:
        raise on_every_rank(StarInputError(f"the tokenizer {cfg.tokenizer} has no EOS token, which ends every answer"))
    if cfg.wandb:
        from ..tracking import Tracker

        run_on_every_rank(world, "wandb", Tracker.require)
    resume = resume_point(cfg, world, layout, ignore=GENERATE_KEYS)  # a generate key is no part of the run
    model = build_model(cfg, len(tokenizer), device, cfg.seed)
    _broadcast(model, world)
    stepper = TorchStepper(MegatronModule(model, cfg, cp_group), cfg, groups, dtype)
    tracker = open_tracker(cfg, layout, ENGINE, dtype, model)

    def write(path: str) -> None:
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(path, "model.pt"))
        stepper.save(path)

    def row_extra(sample) -> dict:
        used = stepper.module.star_config(sample) if cfg.attention == "star" else None  # the others read none
        return {"block_size": used and used.block_size, "anchor_size": used and used.anchor_size,
                "attention": cfg.attention}

    last_saved = train_steps(cfg, stepper, groups, device, data, resume, tracker, engine=ENGINE, write=write,
                             row_extra=row_extra, prog=PROG)
    if rank == 0:
        print(f"[{PROG}] model saved to {last_saved} ({sys.argv[0]} --generate --checkpoint {last_saved} "
              "--context-file F --query Q)", file=sys.stderr, flush=True)
    tracker.finish()
    return 0


def _generate(cfg: MegatronConfig, world, device, cp_group, dp_group) -> int:
    from dataclasses import replace

    from ...integrations.megatron import megatron_generate, megatron_prefill
    from .checkpoints import STATE_FILE, complete_checkpoints, read_state
    from .megatron_model import build_model

    def find():  # every rank reads the same files
        path = cfg.checkpoint or (complete_checkpoints(cfg.out)[-1][1] if complete_checkpoints(cfg.out) else "")
        if not path or not all(os.path.isfile(os.path.join(path, f)) for f in ("model.pt", STATE_FILE)):
            raise StarInputError(f"no checkpoint at {path or cfg.out}: pass --checkpoint OUT/checkpoint-NNNNNNN of a "
                                 "training run, or --out of one")
        try:
            with open(cfg.context_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise StarInputError(f"cannot read the context file {cfg.context_file}: {exc}") from None
        return path, text, read_state(path)["config"]

    path, text, saved = same_everywhere(find)
    run_cfg = replace(cfg, **{k: saved[k] for k in MODEL_KEYS})
    tokenizer = run_on_every_rank(world, "tokenizer", lambda: _tokenizer(run_cfg.tokenizer))
    context = torch.tensor([tokenizer(text)["input_ids"]])
    query = torch.tensor([tokenizer(cfg.query, add_special_tokens=False)["input_ids"]])
    same_everywhere(lambda: _check_star(cfg, dist.get_world_size(world), context.shape[1]))
    if query.shape[1] == 0:
        raise on_every_rank(StarInputError("the query has no tokens; pass --query TEXT"))
    model = build_model(run_cfg, len(tokenizer), device, cfg.seed)
    model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=device, weights_only=True))
    model = model.to(training_dtype(cfg, device)).eval()
    star = cfg.star_config(context.shape[1])
    with torch.no_grad():
        kv = megatron_prefill(model, context, star, cp_group, attention=cfg.attention)
        tokens = megatron_generate(model, kv, query, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    if dist.get_rank(world) == 0:
        print(tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True), flush=True)
    return 0
