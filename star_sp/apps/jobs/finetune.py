"""The fine-tuning job behind ``launch/finetune.py``: a transformers causal LM trained under the anchor
pattern (or, as the control, under global attention), sequence-parallel within groups of ``sp_size``
ranks and data-parallel across the groups, with DeepSpeed (ZeRO 0-3) or plain PyTorch.

    deepspeed --num_gpus N launch/finetune.py --config configs/finetune-reference.toml
    torchrun --nproc_per_node N launch/finetune.py --config configs/finetune-reference.toml --deepspeed ''

Per optimizer step, each rank: for each of the ``gradient_accumulation_steps`` micro-batches, its
group's sample (``data.py``), the loss share (``objective.py``) and its backward; then the step
(``steppers.py``). Rank 0 shows a progress bar with tokens/s, appends a row per ``log_every`` steps to
``OUT/train_log.jsonl`` and W&B (``tracking.py``); checkpoints go to ``OUT/checkpoint-NNNNNNN``
(``checkpoints.py``), and a rerun of the same command resumes from the last one. The loop, the resume
and the command line are ``job_parts.py``'s, as the Megatron-core job's.

Exit codes: 0; 1 after an error (one line; printed once when every rank has the same one, by the first
process of each host); 2 for a bad flag; 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys

import torch
import torch.distributed as dist

from ...errors import StarError, StarInputError
from ..report import run_on_every_rank, exit_on_interrupt, report, same_everywhere
from .loop import add_config_flags, job_parser, load_from_args, open_tracker, resume_point, train_steps, training_dtype
from .settings import FinetuneConfig

PROG = "star-sp finetune"


# -- command line -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(PROG, "Fine-tune a transformers causal LM under the anchor pattern (Star Attention), "
                        "sequence-parallel within groups of --sp-size processes and data-parallel across them, with "
                        "DeepSpeed (ZeRO 0-3) or plain PyTorch; --attention global trains the control.",
                        configs="configs/finetune-*.toml",
                        examples="configs/finetune-reference.toml (GPU), configs/finetune-reference-cpu.toml")
    add_config_flags(parser, FinetuneConfig)
    return parser


def main(argv: list[str] | None = None, *, inspect=None) -> int:
    """``launch/finetune.py``. ``inspect(step, grads)``, if given, sees every parameter's full gradient
    (by name, float32) at each step's boundary, before clipping and the update."""
    # Ctrl-C: one line and exit code 130 on every rank; a process started to ignore it (nohup) keeps so
    with exit_on_interrupt(PROG):
        args = build_parser().parse_args(argv)
        try:
            cfg = same_everywhere(lambda: load_from_args(FinetuneConfig, args))
            return run(cfg, inspect=inspect)
        except StarError as exc:
            report(f"{PROG}: error: {exc}", everywhere=getattr(exc, "on_every_rank", False), prog=PROG,
                   exiting=True)
            return 1


# -- the run ------------------------------------------------------------------------------------------

def run(cfg: FinetuneConfig, *, inspect=None) -> int:
    from ...distributed.process_group import close_process_group, init_from_env

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


def _with_lora(model, table: dict):
    """``model`` wrapped by peft's LoRA (``[lora]``): the base frozen, the adapters trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StarInputError("the [lora] table needs peft: pip install 'star-sp[lora]'") from None
    try:
        return get_peft_model(model, LoraConfig(r=table["rank"], lora_alpha=table["alpha"],
                                                target_modules=table["target_modules"], lora_dropout=0.0))
    except ValueError as exc:  # e.g. a target module the model does not have
        raise StarInputError(f"[lora]: {str(exc).splitlines()[0]}") from None


def _load(cfg: FinetuneConfig, device: torch.device):
    """The tokenizer and the float32 model, checked for training."""
    import transformers

    from ...models import resolve_model

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
    if cfg.lora:
        model = _with_lora(model, cfg.lora)
    model = model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, model


def _run(cfg: FinetuneConfig, world, device: torch.device, inspect) -> int:
    from .data import open_data
    from .groups import TrainGroups
    from .objective import TrainModule
    from .steppers import DeepSpeedStepper, TorchStepper, deepspeed_config

    dtype = training_dtype(cfg, device)
    ds_config = same_everywhere(lambda: deepspeed_config(cfg.deepspeed, cfg, dtype)) if cfg.uses_deepspeed else None
    if cfg.uses_deepspeed and world is None:
        raise StarInputError("a DeepSpeed run needs a launcher: deepspeed --num_gpus N launch/finetune.py ... (or "
                             "set deepspeed = '' for plain PyTorch in one process)")
    groups = TrainGroups.create(world, cfg.sp_size, cfg.collective_timeout_s)
    layout = groups.layout
    rank = layout.rank
    tokenizer, model = run_on_every_rank(world, "load model", lambda: _load(cfg, device))
    data = run_on_every_rank(world, "data", lambda: open_data(cfg, tokenizer, layout.dp_size))
    if cfg.wandb:
        from ..tracking import Tracker

        run_on_every_rank(world, "wandb", Tracker.require)

    resume = resume_point(cfg, world, layout)
    module = TrainModule(model, attention=cfg.attention, sp=groups.sp, sp_rank=layout.sp_rank,
                         context_loss_weight=cfg.context_loss_weight, anchor_source=cfg.anchor_source,
                         backend=cfg.backend, collective_timeout_s=cfg.collective_timeout_s,
                         offload_activations=cfg.offload, loss_chunk_tokens=cfg.loss_chunk_tokens,
                         tiled_mlp=cfg.tiled_mlp)
    if cfg.uses_deepspeed:
        stepper = DeepSpeedStepper(module, cfg, groups, ds_config)
    else:
        stepper = TorchStepper(module, cfg, groups, dtype)
    engine = f"deepspeed ZeRO-{stepper.stage}" if cfg.uses_deepspeed else "torch"
    tracker = open_tracker(cfg, layout, engine, dtype, model)

    def write(path: str) -> None:
        stepper.save_model(path, tokenizer)
        stepper.save(path)

    def row_extra(sample) -> dict:
        return {"block_size": sample.block_size, "anchor_size": sample.anchor_size,
                "context_tokens": sample.context_ids.shape[1]}

    last_saved = train_steps(cfg, stepper, groups, device, data, resume, tracker, engine=engine, write=write,
                             row_extra=row_extra, prog=PROG, inspect=inspect)
    if rank == 0:
        print(f"[{PROG}] model saved to {last_saved} (star-sp generate --model {last_saved} ...)", file=sys.stderr,
              flush=True)
    if cfg.eval_after:
        del stepper, module, model
        _evaluate(cfg, last_saved, tracker, rank)
    tracker.finish()
    return 0


def _evaluate(cfg: FinetuneConfig, model_dir: str, tracker, rank: int) -> None:
    """``star-sp eval`` on the saved model (every rank, star across all of them, global on each) into
    ``OUT/eval``; its table and plots go to W&B."""
    from ..cli import main as cli_main

    out = os.path.join(cfg.out, "eval")
    argv = ["eval", "--model", model_dir, "--out", out, "--tasks", cfg.eval_tasks, "--lengths", cfg.eval_lengths,
            "--samples", str(cfg.eval_samples), "--attention", "star,global", "--block-size", cfg.eval_block_size,
            "--anchor-size", cfg.eval_anchor_size, "--anchor-source", cfg.anchor_source, "--dtype", cfg.dtype,
            "--device", cfg.device, "--seed", str(cfg.seed), "--collective-timeout-s", str(cfg.collective_timeout_s),
            "--prompt", cfg.prompt]
    if cfg.quiet:
        argv.append("--quiet")
    if cli_main(argv) != 0:
        raise StarError(f"the evaluation after training failed (its error is above); the trained model is in "
                        f"{model_dir}")
    if rank == 0:
        plots = sorted(glob.glob(os.path.join(out, "*.png")))
        tracker.log_eval(out, plots)
