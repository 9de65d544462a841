"""What both training jobs (``job.py`` behind ``launch/finetune.py``, ``megatron_job.py`` behind
``launch/megatron_gpt.py``) run the same way: the command line of a config dataclass, the resume point,
the optimizer-step loop with its log and checkpoints, and their small helpers.

The loop, per optimizer step and rank: ``gradient_accumulation_steps`` micro-batches, each one sample
of this rank's group (``data.samples``; the group's ranks share it) through ``stepper.micro_step``;
the sums ``[loss, answer loss, context loss, micro-batches with a context part, tokens]`` (float64,
``[5]``) over the data-parallel groups; rank 0's progress bar, a row per ``log_every`` steps in
``OUT/train_log.jsonl`` and W&B, and a checkpoint ``OUT/checkpoint-NNNNNNN`` every ``save_every`` steps
and at the end (the files of ``write(path)``, then ``trainer_state.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import fields

import torch
import torch.distributed as dist

from ..report import on_every_rank, report
from ...errors import StarInputError


# -- command line -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A bad flag: one line on every rank (``apps.report``), exit code 2."""

    def error(self, message: str):
        report(f"{self.prog}: error: {message} (see --help)", everywhere=True, prog=self.prog, exiting=True)
        raise SystemExit(2)


def job_parser(prog: str, description: str, configs: str, examples: str) -> argparse.ArgumentParser:
    """The job's parser with ``--config`` (a TOML file like ``configs``, a glob); ``add_config_flags``
    adds the rest."""
    parser = _Parser(prog=prog, description=f"{description} Values come from --config (TOML), then from flags: "
                     "every key of the config has a flag.", epilog=f"examples: {examples}")
    parser.add_argument("--config", help=f"run config (TOML): {configs}")
    return parser


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """A flag per field of the config dataclass ``cls`` but those in ``skip`` (``--sp-size`` for
    ``sp_size``; its help is the field's): ``--x/--no-x`` for a bool, comma-separated items for a list,
    else a value of the default's type; a table (``[lora]``) is set in the TOML file only. Every flag defaults
    to None: unset, the config's value."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        default = f.default_factory() if callable(f.default_factory) else f.default
        if isinstance(default, dict):
            continue
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, type=_list_parser(default), default=None, metavar="A,B",
                                help=f"{help_text} (comma-separated)")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)


def load_from_args(cls, args: argparse.Namespace):
    """The config ``cls`` from ``--config`` (TOML), then the flags given."""
    return cls.load(args.config, {k: v for k, v in vars(args).items() if k != "config"})


def _list_parser(example: list):
    kind = type(example[0]) if example else str

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) if kind is str else (int(t) if kind is int and t.lstrip("-").isdigit() else float(t))
                    for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


# -- the run ------------------------------------------------------------------------------------------

def resume_point(cfg, world, layout, ignore: tuple = ()):
    """``(path, state)`` of the last complete checkpoint in ``cfg.out`` to continue from, or None.
    Rank 0 alone reads the folder and tells every rank its verdict in one broadcast, a failure
    included: checkpoints with ``resume = false``, made with other settings (beside ``ignore``'s keys
    and those ``checkpoints.resume_error`` lets a resumed run change) or another world size, or a last
    checkpoint whose ``trainer_state.json`` cannot be read (``checkpoints.read_state``) are the same
    one-line ``StarInputError`` on every rank, at once. Any other error on rank 0 is a guarded step's
    (``distributed.guard``)."""
    from ...distributed.guard import guarded_step
    from .checkpoints import complete_checkpoints, read_state, resume_error

    def kept(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ignore}

    def find():
        found = complete_checkpoints(cfg.out)
        if not found:
            return None
        step, path = found[-1]
        if not cfg.resume:
            raise StarInputError(f"{cfg.out} already holds checkpoints (the last at step {step}); resume them "
                                 "(resume = true) or choose another out folder")
        state = read_state(path)
        error = resume_error(dict(state, config=kept(state["config"])), kept(cfg.to_dict()), layout.world_size, path)
        if error:
            raise StarInputError(error)
        return path, state

    def verdict():
        """Rank 0's ``(resume, None)`` or ``(None, why not)``."""
        try:
            return find(), None
        except StarInputError as exc:
            return None, str(exc)

    with guarded_step("resume", world):
        resume, error = share(world, verdict() if layout.rank == 0 else None)
    if error:
        raise on_every_rank(StarInputError(error))
    return resume


def open_tracker(cfg, layout, engine: str, dtype: torch.dtype, model):
    """The out folder (rank 0 makes it) and rank 0's ``TrainTracker`` with the run's settings and shape."""
    from ..tracking import TrainTracker

    if layout.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    run_info = {**cfg.to_dict(), "world_size": layout.world_size, "dp_size": layout.dp_size, "engine": engine,
                "training_dtype": str(dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters())}
    return TrainTracker(cfg.wandb, run_info, cfg.out, enabled=layout.rank == 0)


def train_steps(cfg, stepper, groups, device: torch.device, data, resume, tracker, *, engine: str, write, row_extra,
                prog: str, inspect=None) -> str:
    """The optimizer steps from ``resume`` (``resume_point``'s; loaded into ``stepper`` here) or step 0
    up to ``cfg.steps``; the path of the last checkpoint. ``write(path)`` writes the model's and the
    stepper's files (every rank calls it); ``row_extra(sample)`` the keys a log row adds, from the step's
    last sample; ``inspect(step, grads)``, if given, goes to ``stepper.micro_step`` at each boundary."""
    from .checkpoints import checkpoint_dir, prune, write_state
    from .data import samples

    layout, rank = groups.layout, groups.layout.rank
    start_step, tokens_seen, last_saved = 0, 0, None
    if resume is not None:
        last_saved, state = resume
        stepper.load(last_saved)
        start_step, tokens_seen = state["step"], state["tokens"]
        if rank == 0:
            print(f"[{prog}] resuming from {last_saved} (step {start_step})", file=sys.stderr, flush=True)

    def save(step: int) -> str:
        path = checkpoint_dir(cfg.out, step)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        barrier(groups.world)
        write(path)
        barrier(groups.world)
        if rank == 0:
            write_state(path, {"step": step, "tokens": tokens_seen, "world_size": layout.world_size, "engine": engine,
                               "config": cfg.to_dict()})
            prune(cfg.out, cfg.keep_last)
        return path

    bar = Bar(enabled=rank == 0 and not cfg.quiet, start=start_step, total=cfg.steps)
    log_path = os.path.join(cfg.out, "train_log.jsonl")
    gas = cfg.gradient_accumulation_steps
    stream = samples(data, start_step, cfg.steps, gas, layout.dp_rank, cfg.num_workers)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, cfg.steps):
        done = step + 1
        sums = torch.zeros(5, dtype=torch.float64)
        for micro in range(gas):
            sample = next(stream)
            hook = None if inspect is None else (lambda grads, s=step: inspect(s, grads))
            info = stepper.micro_step(sample, boundary=micro == gas - 1, inspect=hook)
            sums += torch.tensor([info["loss"], info.get("answer_loss") or 0.0, info.get("context_loss") or 0.0,
                                  info.get("context_loss") is not None, sample.tokens], dtype=torch.float64)
        sums = sum_over(groups.dp, sums, device)  # every group's sample once: its ranks share it
        tokens_seen += int(sums[4])
        window_tokens += int(sums[4])
        stats = stepper.stats()
        loss = float(sums[0]) / (gas * layout.dp_size)
        bar.update(done, loss, stats.get("lr"), tokens_seen)
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            row = {"step": done, "loss": loss, "answer_loss": float(sums[1]) / (gas * layout.dp_size),
                   "context_loss": float(sums[2]) / float(sums[3]) if sums[3] else None,
                   "lr": stats.get("lr"), "grad_norm": stats.get("grad_norm"), "tokens": tokens_seen,
                   "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                   "peak_memory_gb": peak_memory_gb(device), **row_extra(sample)}
            window_start, window_tokens = time.perf_counter(), 0
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                tracker.log_step(done, row)
        if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
            last_saved = save(done)
    bar.close()
    if last_saved is None:  # nothing to train and nothing saved before: keep the model as it is
        last_saved = save(start_step)
    return last_saved


# -- helpers ------------------------------------------------------------------------------------------

def share(world, obj):
    """Rank 0's ``obj`` on every rank."""
    if world is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(world, 0), group=world)
    return box[0]


def barrier(world) -> None:
    if world is not None:
        dist.barrier(group=world)


def sum_over(group, values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if group is None:
        return values
    on_device = values.to(device)
    dist.all_reduce(on_device, group=group)
    return on_device.cpu()


def training_dtype(cfg, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Bar:
    """``finetune [#####.....] step 12/100  loss 2.345  lr 1.0e-04  3,456 tokens/s  0:42`` on stderr."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled, self.start, self.total = enabled, start, total
        self.t0 = time.perf_counter()
        self.tokens0 = None

    def update(self, done: int, loss: float, lr: float | None, tokens: int) -> None:
        if not self.enabled:
            return
        if self.tokens0 is None:
            self.tokens0, self.t0 = tokens, time.perf_counter()  # the first step includes start-up
            speed = ""
        else:
            elapsed = time.perf_counter() - self.t0
            speed = f"  {(tokens - self.tokens0) / elapsed:,.0f} tokens/s" if elapsed > 0 else ""
        width = 24
        filled = width * done // self.total
        lr_text = f"  lr {lr:.2e}" if lr is not None else ""
        sys.stderr.write(f"\rfinetune [{'#' * filled}{'.' * (width - filled)}] step {done}/{self.total}  "
                         f"loss {loss:.4f}{lr_text}{speed}  {time.perf_counter() - self.t0:6.1f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tokens0 is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()
