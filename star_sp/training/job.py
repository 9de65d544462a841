"""The fine-tuning job behind ``launch/finetune.py``: a transformers causal LM trained under the anchor
pattern (or, as the control, under global attention), sequence-parallel within groups of ``sp_size``
ranks and data-parallel across the groups, with DeepSpeed (ZeRO 0-3) or plain PyTorch.

    deepspeed --num_gpus N launch/finetune.py --config configs/finetune-reference.toml
    torchrun --nproc_per_node N launch/finetune.py --config configs/finetune-reference.toml --deepspeed ''

Per optimizer step, each rank: for each of the ``gradient_accumulation_steps`` micro-batches, its
group's sample (``data.py``), the loss share (``objective.py``) and its backward; then the step
(``steppers.py``). Rank 0 shows a progress bar with tokens/s, appends a row per ``log_every`` steps to
``OUT/train_log.jsonl`` and W&B (``tracking.py``); checkpoints go to ``OUT/checkpoint-NNNNNNN``
(``checkpoints.py``), and a rerun of the same command resumes from the last one.

Exit codes: 0; 1 after an error (one line; printed once when every rank has the same one, by the first
process of each host); 2 for a bad flag; 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import resource
import sys
import time
from dataclasses import fields

import torch
import torch.distributed as dist

from ..cli_report import everyone, exit_on_interrupt, on_every_rank, report, same_everywhere
from ..errors import StarError, StarInputError
from .settings import FinetuneConfig

PROG = "star-sp finetune"


# -- command line -------------------------------------------------------------------------------------

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fine-tune a transformers causal LM under the anchor pattern (Star "
                     "Attention), sequence-parallel within groups of --sp-size processes and data-parallel across "
                     "them, with DeepSpeed (ZeRO 0-3) or plain PyTorch; --attention global trains the control. "
                     "Values come from --config (TOML), then from flags: every key of the config has a flag.",
                     epilog="examples: configs/finetune-reference.toml (GPU), configs/finetune-reference-cpu.toml")
    parser.add_argument("--config", help="run config (TOML): configs/finetune-*.toml")
    defaults = FinetuneConfig.__dataclass_fields__
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default_factory() if callable(defaults[f.name].default_factory) else f.default
        help_text = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, type=_list_parser(default), default=None, metavar="A,B",
                                help=f"{help_text} (comma-separated)")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        report(f"{PROG}: error: {message} (see --help)", everywhere=True, prog=PROG, exiting=True)
        raise SystemExit(2)


def main(argv: list[str] | None = None, *, inspect=None) -> int:
    """``launch/finetune.py``. ``inspect(step, grads)``, if given, sees every parameter's full gradient
    (by name, float32) at each step's boundary, before clipping and the update."""
    # Ctrl-C: one line and exit code 130 on every rank; a process started to ignore it (nohup) keeps so
    with exit_on_interrupt(PROG):
        args = build_parser().parse_args(argv)
        overrides = {k: v for k, v in vars(args).items() if k != "config"}
        try:
            cfg = same_everywhere(lambda: FinetuneConfig.load(args.config, overrides))
            return run(cfg, inspect=inspect)
        except StarError as exc:
            report(f"{PROG}: error: {exc}", everywhere=getattr(exc, "on_every_rank", False), prog=PROG,
                   exiting=True)
            return 1


# -- the run ------------------------------------------------------------------------------------------

def run(cfg: FinetuneConfig, *, inspect=None) -> int:
    from ..distributed.process_group import close_process_group, init_from_env

    world, device, created = init_from_env(cfg.collective_timeout_s, cfg.device)
    ok = False
    try:
        with _quiet_transformers():
            code = _run(cfg, world, device, inspect)
        ok = code == 0
        return code
    finally:
        if created and dist.is_initialized():
            close_process_group(ok)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars (loading and writing weights) off for the run, as before after it:
    the job's own bar says what happens."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _share(world, obj):
    """Rank 0's ``obj`` on every rank."""
    if world is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(world, 0), group=world)
    return box[0]


def _load(cfg: FinetuneConfig, device: torch.device):
    """The tokenizer and the float32 model, checked for training."""
    import transformers

    from ..models import resolve_model

    path = resolve_model(cfg.model)
    if not os.path.isdir(path):
        raise StarInputError(f"model directory {cfg.model} does not exist; pass a model directory in the "
                             "transformers layout or 'reference'")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no tokenizer files, or unreadable ones
        raise StarInputError(f"{cfg.model} has no usable tokenizer files; fine-tuning writes its samples as text "
                             "and saves the tokenizer beside the model") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise StarInputError(f"cannot load a causal LM from {cfg.model}: {str(exc).splitlines()[0]}") from None
    dropout = getattr(model.config, "attention_dropout", 0.0) or 0.0
    dropout = max([dropout] + [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)])
    if dropout > 0:
        raise StarInputError(f"{cfg.model} uses dropout (p = {dropout}); under Star Attention every host computes "
                             "the target rows, and their dropout masks would differ; set the model's dropout to 0")
    if cfg.data == "tasks" and tokenizer.eos_token_id is None:
        raise StarInputError(f"the tokenizer of {cfg.model} has no EOS token, which ends every answer; set one")
    return tokenizer, model.to(device).train()


def _dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _run(cfg: FinetuneConfig, world, device: torch.device, inspect) -> int:
    from .checkpoints import checkpoint_dir, complete_checkpoints, prune, read_state, resume_error, write_state
    from .data import open_data, samples
    from .groups import TrainGroups
    from .objective import TrainModule
    from .steppers import DeepSpeedStepper, TorchStepper, deepspeed_config
    from .tracking import TrainTracker

    dtype = _dtype(cfg, device)
    ds_config = same_everywhere(lambda: deepspeed_config(cfg.deepspeed, cfg, dtype)) if cfg.uses_deepspeed else None
    if cfg.uses_deepspeed and world is None:
        raise StarInputError("a DeepSpeed run needs a launcher: deepspeed --num_gpus N launch/finetune.py ... (or "
                             "set deepspeed = '' for plain PyTorch in one process)")
    groups = TrainGroups.create(world, cfg.sp_size, cfg.collective_timeout_s)
    layout = groups.layout
    rank = layout.rank
    tokenizer, model = everyone(world, "load model", lambda: _load(cfg, device))
    data = everyone(world, "data", lambda: open_data(cfg, tokenizer, layout.dp_size))
    if cfg.wandb:
        from ..tracking import Tracker

        everyone(world, "wandb", Tracker.require)

    def find_resume():  # on rank 0, which alone reads the out folder
        found = complete_checkpoints(cfg.out)
        if not found:
            return None, None
        step, path = found[-1]
        if not cfg.resume:
            return None, (f"{cfg.out} already holds checkpoints (the last at step {step}); resume them (resume = "
                          "true) or choose another out folder")
        state = read_state(path)
        return (path, state), resume_error(state, cfg.to_dict(), layout.world_size, path)

    resume, error = _share(world, find_resume() if rank == 0 else None)
    if error:
        raise on_every_rank(StarInputError(error))

    module = TrainModule(model, attention=cfg.attention, sp=groups.sp, sp_rank=layout.sp_rank,
                         context_loss_weight=cfg.context_loss_weight, anchor_source=cfg.anchor_source,
                         backend=cfg.backend, collective_timeout_s=cfg.collective_timeout_s)
    if cfg.uses_deepspeed:
        stepper = DeepSpeedStepper(module, cfg, groups, ds_config)
    else:
        stepper = TorchStepper(module, cfg, groups, dtype)
    start_step, tokens_seen = 0, 0
    if resume is not None:
        path, state = resume
        stepper.load(path)
        start_step, tokens_seen = state["step"], state["tokens"]
    engine = f"deepspeed ZeRO-{stepper.stage}" if cfg.uses_deepspeed else "torch"
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    run_info = {**cfg.to_dict(), "world_size": layout.world_size, "dp_size": layout.dp_size, "engine": engine,
                "training_dtype": str(dtype).removeprefix("torch."),
                "parameters": sum(p.numel() for p in model.parameters())}
    tracker = TrainTracker(cfg.wandb, run_info, cfg.out, enabled=rank == 0)

    def save(step: int) -> str:
        path = checkpoint_dir(cfg.out, step)
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        _barrier(world)
        stepper.save_model(path, tokenizer)
        stepper.save(path)
        _barrier(world)
        if rank == 0:
            write_state(path, {"step": step, "tokens": tokens_seen, "world_size": layout.world_size, "engine": engine,
                               "config": cfg.to_dict()})
            prune(cfg.out, cfg.keep_last)
        return path

    last_saved = resume[0] if resume is not None else None
    if rank == 0 and start_step:
        print(f"[{PROG}] resuming from {last_saved} (step {start_step})", file=sys.stderr, flush=True)
    bar = _Bar(enabled=rank == 0 and not cfg.quiet, start=start_step, total=cfg.steps)
    log_path = os.path.join(cfg.out, "train_log.jsonl")
    gas = cfg.gradient_accumulation_steps
    stream = samples(data, start_step, cfg.steps, gas, layout.dp_rank, cfg.num_workers)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, cfg.steps):
        done = step + 1
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        # [loss, answer loss, context loss, micro-batches with a context part, tokens]
        sums = torch.zeros(5, dtype=torch.float64)
        for micro in range(gas):
            sample = next(stream)
            hook = None if inspect is None else (lambda grads, s=step: inspect(s, grads))
            info = stepper.micro_step(sample, boundary=micro == gas - 1, inspect=hook)
            sums += torch.tensor([info["loss"], info.get("answer_loss") or 0.0, info.get("context_loss") or 0.0,
                                  info.get("context_loss") is not None, sample.tokens], dtype=torch.float64)
        sums = _sum_over(groups.dp, sums, device)  # every group's sample once: its SP ranks share it
        tokens_seen += int(sums[4])
        window_tokens += int(sums[4])
        stats = stepper.stats()
        loss = float(sums[0]) / (gas * layout.dp_size)
        bar.update(done, loss, stats.get("lr"), tokens_seen)
        if log_now:
            elapsed = time.perf_counter() - window_start
            row = {"step": done, "loss": loss, "answer_loss": float(sums[1]) / (gas * layout.dp_size),
                   "context_loss": float(sums[2]) / float(sums[3]) if sums[3] else None,
                   "lr": stats.get("lr"), "grad_norm": stats.get("grad_norm"), "tokens": tokens_seen,
                   "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                   "peak_memory_gb": _peak_memory_gb(device), "block_size": sample.block_size,
                   "anchor_size": sample.anchor_size, "context_tokens": sample.context_ids.shape[1]}
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
    if rank == 0:
        print(f"[{PROG}] model saved to {last_saved} (star-sp generate --model {last_saved} ...)", file=sys.stderr,
              flush=True)
    if cfg.eval_after:
        del stepper, module, model
        _evaluate(cfg, last_saved, tracker, rank)
    tracker.finish()
    return 0


def _barrier(world) -> None:
    if world is not None:
        dist.barrier(group=world)


def _sum_over(group, values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if group is None:
        return values
    on_device = values.to(device)
    dist.all_reduce(on_device, group=group)
    return on_device.cpu()


def _evaluate(cfg: FinetuneConfig, model_dir: str, tracker, rank: int) -> None:
    """``star-sp eval`` on the saved model (every rank, star across all of them, global on each) into
    ``OUT/eval``; its table and plots go to W&B."""
    from ..cli import main as cli_main

    out = os.path.join(cfg.out, "eval")
    argv = ["eval", "--model", model_dir, "--out", out, "--tasks", cfg.eval_tasks, "--lengths", cfg.eval_lengths,
            "--samples", str(cfg.eval_samples), "--attention", "star,global", "--block-size", cfg.eval_block_size,
            "--anchor-size", cfg.eval_anchor_size, "--anchor-source", cfg.anchor_source, "--dtype", cfg.dtype,
            "--device", cfg.device, "--seed", str(cfg.seed), "--collective-timeout-s", str(cfg.collective_timeout_s)]
    if cfg.quiet:
        argv.append("--quiet")
    if cli_main(argv) != 0:
        raise StarError(f"the evaluation after training failed (its error is above); the trained model is in "
                        f"{model_dir}")
    if rank == 0:
        plots = sorted(glob.glob(os.path.join(out, "*.png")))
        tracker.log_eval(out, plots)


class _Bar:
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
