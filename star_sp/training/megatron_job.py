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
AdamW and the schedule; ``trainer_state.json`` last), and a rerun of the same command resumes.

Generate: the checkpoint's model (its shape and tokenizer from its ``trainer_state.json``), the context
file's ids ``[1, Lc]`` prefilled by phase 1 on every CP rank (``megatron_prefill``), the query answered
by phase-2 greedy decoding (``megatron_generate``); rank 0 prints the answer on stdout.

Exit codes: 0; 1 after an error (one line, on every rank); 2 for a bad flag; 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from ..cli_report import everyone, exit_on_interrupt, on_every_rank, report, same_everywhere
from ..errors import StarError, StarInputError
from .job import _Bar, _barrier, _dtype, _list_parser, _peak_memory_gb, _share, _sum_over
from .megatron_model import MODEL_KEYS, RESUMABLE, MegatronConfig, quiet_megatron

PROG = "star-sp megatron"
STAR_FLAGS = ("attention", "star_block_size", "star_anchor_size", "star_anchor_source")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        report(f"{PROG}: error: {message} (see --help)", everywhere=True, prog=PROG, exiting=True)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """``--config``, Star's flags (``integrations.megatron_args.add_star_args``) and a flag per other key."""
    from ..integrations.megatron_args import add_star_args

    parser = _Parser(prog=PROG, description="Train a Megatron-core GPT model under Star Attention with context "
                     "parallelism (the CP group is the Star group; data-parallel across groups), or answer a query "
                     "over a long context with a checkpoint (--generate). Values come from --config (TOML), then "
                     "from flags: every key of the config has a flag.",
                     epilog="examples: configs/megatron-tiny-cpu.toml (CPU), configs/megatron-reference.toml (GPU)")
    parser.add_argument("--config", help="run config (TOML): configs/megatron-*.toml")
    add_star_args(parser)
    parser.set_defaults(attention=None, star_anchor_source=None)  # unset: the config's value
    for action in parser._actions:  # their help as this job reads them (the config's keys)
        if action.dest in STAR_FLAGS:
            action.help = MegatronConfig.__dataclass_fields__[action.dest].metadata["help"]
    for f in MegatronConfig.__dataclass_fields__.values():
        if f.name in STAR_FLAGS:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        default = f.default_factory() if callable(f.default_factory) else f.default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, type=_list_parser(default), default=None, metavar="A,B",
                                help=f"{help_text} (comma-separated)")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``launch/megatron_gpt.py``."""
    with exit_on_interrupt(PROG):
        args = build_parser().parse_args(argv)
        overrides = {k: v for k, v in vars(args).items() if k != "config"}
        try:
            cfg = same_everywhere(lambda: MegatronConfig.load(args.config, overrides))
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            shortest = cfg.lengths[0] if cfg.data == "tasks" and not cfg.generate else None
            same_everywhere(lambda: _check_star(cfg, world_size, shortest))  # before any process group
            return run(cfg)
        except StarError as exc:
            report(f"{PROG}: error: {exc}", everywhere=getattr(exc, "on_every_rank", False), prog=PROG, exiting=True)
            return 1


def _check_star(cfg: MegatronConfig, world_size: int, sequence: int | None) -> None:
    from ..integrations.megatron_args import check_star_args

    check_star_args(cfg.flags(), world_size, sequence if cfg.attention == "star" else None)


def run(cfg: MegatronConfig) -> int:
    from ..distributed.process_group import close_process_group, init_from_env
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

    from ..models import SHIPPED, resolve_model

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
        from ..ops.backends import many_shapes
        from .megatron_loss import megatron_train_loss

        with many_shapes():
            loss, parts = megatron_train_loss(
                self.model, sample.context_ids, sample.target_ids, sample.labels, self.star_config(sample), self.cp,
                context_loss_weight=self.cfg.context_loss_weight, attention=self.cfg.attention, return_parts=True)
        weight = self.cfg.context_loss_weight
        return loss, {"loss": float(loss.detach()), "answer_loss": float(parts["answer"]),
                      "context_loss": float(parts["context"]) if weight else None}


def _train(cfg: MegatronConfig, world, device, cp_group, dp_group) -> int:
    from .checkpoints import checkpoint_dir, complete_checkpoints, prune, read_state, resume_error, write_state
    from .data import open_data, samples
    from .groups import GroupLayout, TrainGroups
    from .megatron_model import build_model
    from .steppers import TorchStepper
    from .tracking import TrainTracker

    layout = GroupLayout(dist.get_world_size(world), dist.get_rank(world), cfg.context_parallel_size)
    groups = TrainGroups(layout, world, cp_group, dp_group)
    rank, dtype = layout.rank, _dtype(cfg, device)
    tokenizer = everyone(world, "tokenizer", lambda: _tokenizer(cfg.tokenizer))
    data = everyone(world, "data", lambda: open_data(cfg, tokenizer, layout.dp_size))
    if cfg.data != "tasks" and cfg.attention == "star" and cfg.context_parallel_size > 1:  # the tasks': in main
        shortest = min(len(ids) for ids in tokenizer([r["context"] for r in data.records])["input_ids"])
        same_everywhere(lambda: _check_star(cfg, layout.world_size, shortest))
    if cfg.data == "tasks" and tokenizer.eos_token_id is None:
        raise on_every_rank(StarInputError(f"the tokenizer {cfg.tokenizer} has no EOS token, which ends every answer"))
    if cfg.wandb:
        from ..tracking import Tracker

        everyone(world, "wandb", Tracker.require)

    def identity(config: dict) -> dict:  # the keys a resumed run must keep
        return {k: v for k, v in config.items() if k not in RESUMABLE}

    def find_resume():  # on rank 0, which alone reads the out folder
        found = complete_checkpoints(cfg.out)
        if not found:
            return None, None
        step, path = found[-1]
        if not cfg.resume:
            return None, (f"{cfg.out} already holds checkpoints (the last at step {step}); resume them (resume = "
                          "true) or choose another out folder")
        state = read_state(path)
        saved = dict(state, config=identity(state.get("config", {})))
        return (path, state), resume_error(saved, identity(cfg.to_dict()), layout.world_size, path)

    resume, error = _share(world, find_resume() if rank == 0 else None)
    if error:
        raise on_every_rank(StarInputError(error))
    model = build_model(cfg, len(tokenizer), device, cfg.seed)
    _broadcast(model, world)
    stepper = TorchStepper(MegatronModule(model, cfg, cp_group), cfg, groups, dtype)
    start_step, tokens_seen = 0, 0
    if resume is not None:
        stepper.load(resume[0])
        start_step, tokens_seen = resume[1]["step"], resume[1]["tokens"]
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if resume is not None:
            print(f"[{PROG}] resuming from {resume[0]} (step {start_step})", file=sys.stderr, flush=True)
    run_info = {**cfg.to_dict(), "world_size": layout.world_size, "dp_size": layout.dp_size, "engine": "megatron-core",
                "training_dtype": str(dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters())}
    tracker = TrainTracker(cfg.wandb, run_info, cfg.out, enabled=rank == 0)

    def save(step: int) -> str:
        path = checkpoint_dir(cfg.out, step)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
            torch.save(model.state_dict(), os.path.join(path, "model.pt"))
            stepper.save(path)
            write_state(path, {"step": step, "tokens": tokens_seen, "world_size": layout.world_size,
                               "engine": "megatron-core", "config": cfg.to_dict()})
            prune(cfg.out, cfg.keep_last)
        _barrier(world)
        return path

    last_saved = resume[0] if resume is not None else None
    bar = _Bar(enabled=rank == 0 and not cfg.quiet, start=start_step, total=cfg.steps)
    gas = cfg.gradient_accumulation_steps
    stream = samples(data, start_step, cfg.steps, gas, layout.dp_rank, cfg.num_workers)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, cfg.steps):
        done = step + 1
        sums = torch.zeros(5, dtype=torch.float64)  # loss, answer, context, micro-batches with context, tokens
        for micro in range(gas):
            sample = next(stream)
            info = stepper.micro_step(sample, boundary=micro == gas - 1)
            sums += torch.tensor([info["loss"], info["answer_loss"], info["context_loss"] or 0.0,
                                  info["context_loss"] is not None, sample.tokens], dtype=torch.float64)
        sums = _sum_over(dp_group, sums, device)  # every group's sample once
        tokens_seen += int(sums[4])
        window_tokens += int(sums[4])
        stats, loss = stepper.stats(), float(sums[0]) / (gas * layout.dp_size)
        bar.update(done, loss, stats.get("lr"), tokens_seen)
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            used = stepper.module.star_config(sample) if cfg.attention == "star" else None  # the others read none
            row = {"step": done, "loss": loss, "answer_loss": float(sums[1]) / (gas * layout.dp_size),
                   "context_loss": float(sums[2]) / float(sums[3]) if sums[3] else None, "lr": stats.get("lr"),
                   "grad_norm": stats.get("grad_norm"), "tokens": tokens_seen,
                   "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                   "peak_memory_gb": _peak_memory_gb(device), "block_size": used and used.block_size,
                   "anchor_size": used and used.anchor_size, "attention": cfg.attention}
            window_start, window_tokens = time.perf_counter(), 0
            if rank == 0:
                with open(os.path.join(cfg.out, "train_log.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                tracker.log_step(done, row)
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            last_saved = save(done)
    bar.close()
    if last_saved is None:  # nothing to train and nothing saved before: keep the model as it is
        last_saved = save(start_step)
    if rank == 0:
        print(f"[{PROG}] model saved to {last_saved} ({sys.argv[0]} --generate --checkpoint {last_saved} "
              "--context-file F --query Q)", file=sys.stderr, flush=True)
    tracker.finish()
    return 0


def _generate(cfg: MegatronConfig, world, device, cp_group, dp_group) -> int:
    from dataclasses import replace

    from ..integrations.megatron import megatron_generate, megatron_prefill
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
    tokenizer = everyone(world, "tokenizer", lambda: _tokenizer(run_cfg.tokenizer))
    context = torch.tensor([tokenizer(text)["input_ids"]])
    query = torch.tensor([tokenizer(cfg.query, add_special_tokens=False)["input_ids"]])
    same_everywhere(lambda: _check_star(cfg, dist.get_world_size(world), context.shape[1]))
    if query.shape[1] == 0:
        raise on_every_rank(StarInputError("the query has no tokens; pass --query TEXT"))
    model = build_model(run_cfg, len(tokenizer), device, cfg.seed)
    model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=device, weights_only=True))
    model = model.to(_dtype(cfg, device)).eval()
    star = cfg.star_config(context.shape[1])
    with torch.no_grad():
        kv = megatron_prefill(model, context, star, cp_group, attention=cfg.attention)
        tokens = megatron_generate(model, kv, query, cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    if dist.get_rank(world) == 0:
        print(tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True), flush=True)
    return 0
