"""``star-sp generate``: answer one query over a long context, in one process or one per host, and print
the answer (text or one JSON record) and a one-line timing summary.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import torch
import torch.distributed as dist

from ..distributed.process_group import close_process_group
from .inputs import read_inputs
from .model_arg import load_model, load_tokenizer, model_config
from .report import run_on_every_rank, same_everywhere, prints_for_host


class _Progress:
    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label, self.start = enabled, label, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] layer {done}/{total} "
                         f"{time.perf_counter() - self.start:6.1f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def generate(args) -> int:
    from ..distributed.process_group import init_from_env
    from .runconfig import RunConfig

    overrides = {k: getattr(args, k, None) for k in (
        "model", "random_weights", "dtype", "device", "attention", "block_size", "anchor_size", "anchor_source",
        "phase2_merge", "backend", "collective_timeout_s", "decode_graphs", "decode_kernel", "compile", "max_new_tokens", "do_sample",
        "temperature", "top_p", "top_k", "seed", "stop")}
    cfg = same_everywhere(lambda: RunConfig.load(args.config, overrides))
    group, device, created = init_from_env(cfg.collective_timeout_s, cfg.device)
    ok = False
    try:
        code = _generate(args, cfg, group, device)
        ok = code == 0
        return code
    finally:
        if created:
            close_process_group(ok)


def _generate(args, cfg, group, device) -> int:
    from ..integrations.hf.engine import StarEngine

    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    show = prints_for_host(rank) and not args.quiet and not args.json
    path, config = run_on_every_rank(group, "model config", lambda: model_config(cfg))
    tokenizer = load_tokenizer(path)
    context_ids, query_ids = read_inputs(args, cfg, tokenizer, config.vocab_size, group)  # before the weights load
    model = run_on_every_rank(group, "load model", lambda: load_model(cfg, path, config, device, progress=show))
    engine = run_on_every_rank(group, "engine", lambda: StarEngine(model, cfg.star_config(), group, attention=cfg.attention))
    if args.warmup:
        engine.generate(engine.prefill(context_ids), query_ids, cfg.max_new_tokens, sampling=cfg.sampling())
    context = engine.prefill(context_ids, progress=_Progress(show, f"prefill {context_ids.shape[1]} tokens"))
    prefill_s, prefill_compile_s = engine.stats["prefill_s"], engine.stats.get("compile_s", 0.0)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    tokens = engine.generate(context, query_ids, cfg.max_new_tokens, sampling=cfg.sampling(), eos_token_id=eos,
                             stop_strings=cfg.stop or None, tokenizer=tokenizer if cfg.stop else None)
    stats = dict(engine.stats, prefill_s=prefill_s, peak_memory_gb=_peak_memory_gb(device), world_size=world,
                 compile_s=prefill_compile_s + engine.stats["compile_s"] if cfg.compile else None,
                 attention=cfg.attention, block_size=cfg.block_size, anchor_size=cfg.anchor_size or cfg.block_size)
    if rank == 0:
        answers = [_answer(row.tolist(), tokenizer, eos) for row in tokens]
        stats = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in stats.items()}
        several = isinstance(query_ids, list)
        if args.json:  # a stat that cannot be measured (decode speed of one new token) is null
            record = {"answers": answers} if several else answers[0]
            print(json.dumps({**record, **stats}, allow_nan=False))
        else:
            for i, a in enumerate(answers):
                shown = a["text"] if a["text"] is not None else " ".join(map(str, a["tokens"]))
                print(f"[{i + 1}] {shown}" if several else shown)
            print(_stats_line(cfg, world, context_ids.shape[1], stats), file=sys.stderr)
    return 0


def _answer(ids: list[int], tokenizer, eos) -> dict:
    """One answer's tokens (up to and including its EOS; after it a question decoded with others holds
    padding) and text."""
    ends = [eos] if isinstance(eos, int) else list(eos or [])
    cut = next((i + 1 for i, t in enumerate(ids) if t in ends), len(ids))
    ids = ids[:cut]
    return {"tokens": ids, "text": tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None}


def _stats_line(cfg, world: int, context_len: int, stats: dict) -> str:
    """The one-line timing summary; a stat that is None (not measurable) reads n/a."""
    def num(key, fmt):
        return "n/a" if stats.get(key) is None else format(stats[key], fmt)

    speed = stats.get("decode_tokens_per_s")
    decode = f"{speed:.1f} tokens/s" if speed is not None else \
        f"decode speed n/a ({stats.get('new_tokens', 0)} new token(s))"
    sizes = f", block {cfg.block_size}, anchor {stats['anchor_size']}" if cfg.attention == "star" else ""
    if stats.get("compile_s") is not None:  # inside the prefill and first-token times below
        sizes += f", compiled ({stats['compile_s']:.1f} s of it compiling)"
    return (f"[star-sp] {cfg.attention} attention, {world} process(es), context {context_len} tokens{sizes}: "
            f"prefill {num('prefill_s', '.3f')} s, "
            f"first token {num('first_token_s', '.3f')} s, {decode}, "
            f"peak memory {num('peak_memory_gb', '.2f')} GB (rank 0)")
