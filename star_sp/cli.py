"""The ``star-sp`` command line. ``star-sp generate --help`` explains every flag.

Runs in one process, or one process per host under ``torchrun`` / ``deepspeed`` (``launch/infer.py``).
Rank 0 reads the inputs and sends the token ids to every rank; a user error is raised on every rank and
ends every process with exit code 1 and one line, printed once (by the first process of each host);
Ctrl-C ends every process with exit code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

from .config import DECODE_GRAPHS
from .errors import StarError, StarInputError
from .models import resolve_model

EXAMPLES = """examples (from the repository's root; the shipped model answers in the RULER tasks' wording):
  star-sp generate --model reference --context-file examples/needle-2k.txt \\
      --query-file examples/needle-2k-query.txt --block-size 512 --max-new-tokens 8
  torchrun --standalone --nproc_per_node 2 launch/infer.py --model reference \\
      --context-file examples/needle-2k.txt --query-file examples/needle-2k-query.txt \\
      --block-size 512 --max-new-tokens 8
  star-sp generate --model configs/models/tiny-llama --random-weights --random-context 8192 \\
      --random-query 16 --max-new-tokens 16 --attention global   # timings only, no tokenizer needed
configs/llama-3.1-8b-random.toml runs a Llama-3.1-8B-shaped model with random weights (16 GB, for a GPU).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="star-sp", description="Star Attention for long-context LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser(
        "generate", help="answer a query over a long context",
        description="Encode a long context with Star Attention (phase 1: blocks behind an anchor, one run of "
                    "blocks per process, no communication), then answer a query (phase 2: attention over every "
                    "process's KV, merged by all-reduce). Values come from --config, then from flags.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = gen.add_argument_group("model")
    g.add_argument("--config", help="run config (TOML); flags override its values (configs/example-cpu.toml, "
                   "configs/llama-3.1-8b-random.toml)")
    g.add_argument("--model", help="model directory in the transformers layout (config, weights, tokenizer), "
                   "or 'reference' for the model shipped with star-sp")
    g.add_argument("--random-weights", action="store_true", default=None,
                   help="build the model from its config with random weights (for timings)")
    g.add_argument("--dtype", choices=("auto", "float32", "float64", "bfloat16", "float16"),
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", help="auto (CUDA if present, one GPU per process), cpu, cuda, cuda:N")
    g = gen.add_argument_group("inputs (one context source and one query source)")
    g.add_argument("--context-file", help="text file holding the context")
    g.add_argument("--context-ids", help="file of whitespace-separated token ids (no tokenizer needed)")
    g.add_argument("--random-context", type=int, metavar="N", help="N random token ids (timings)")
    g.add_argument("--query", help="query text, appended after the context")
    g.add_argument("--query-file", help="text file holding the query (its final newlines dropped)")
    g.add_argument("--query-ids", help="whitespace-separated token ids of the query")
    g.add_argument("--random-query", type=int, metavar="N", help="N random token ids as the query (timings)")
    g = gen.add_argument_group("star attention")
    g.add_argument("--attention", choices=("star", "global", "ring"),
                   help="star (default), the plain model (one process), or exact ring attention across the processes")
    g.add_argument("--block-size", type=int, help="context tokens per block (default 4096)")
    g.add_argument("--anchor-size", type=int, help="anchor tokens (default: the block size)")
    g.add_argument("--anchor-source", choices=("broadcast", "recompute"),
                   help="broadcast the anchor's KV from the host of block 0 (default) or recompute it everywhere")
    g.add_argument("--phase2-merge", choices=("allreduce", "allgather"),
                   help="merge hosts' query results by all-reduce (default) or all-gather (the paper's form)")
    g.add_argument("--backend", choices=("auto", "cpu", "flash", "cudnn", "efficient", "math"),
                   help="attention kernel (auto picks the fastest that fits)")
    g.add_argument("--collective-timeout-s", type=float, help="seconds a collective may wait (default 600)")
    g.add_argument("--decode-graphs", choices=DECODE_GRAPHS,
                   help="decode steps as one CUDA graph per request (auto: in one process on CUDA)")
    g = gen.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default 64)")
    g.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int, help="seed of sampling and of random inputs/weights")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g = gen.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    g.add_argument("--quiet", action="store_true", help="no progress bars (weights loading, prefill)")
    g.add_argument("--warmup", action="store_true",
                   help="run the whole request once untimed first (kernel plans, allocator), for timings")

    ev = sub.add_parser(
        "eval", help="RULER-style accuracy of star against global attention",
        description="Generate RULER-style tasks at given lengths in the model's own tokens, answer them with each "
                    "method, score them as RULER does, and write results.jsonl (resumable), summary.md/json and "
                    "PNG plots to --out. Runs in one process or one process per host under torchrun/deepspeed.",
        epilog="examples (the shipped model, about a minute each on 2 CPU cores):\n"
               "  star-sp eval --model reference --tasks niah_single_2,vt --lengths 2k --attention star,global \\\n"
               "      --block-size 1/2,1/4 --anchor-size block,0 --samples 2 --dtype float32 --out runs/eval\n"
               "  torchrun --standalone --nproc_per_node 2 launch/eval.py --model reference --tasks niah_single_2,vt \\\n"
               "      --lengths 2k --attention star,global --block-size 1/2,1/4 --anchor-size block,0 --samples 2 \\\n"
               "      --dtype float32 --out runs/eval-2hosts                                   # two hosts",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", required=True,
                    help="model directory with tokenizer files, or 'reference' for the model shipped with star-sp")
    ev.add_argument("--dtype", choices=("auto", "float32", "float64", "bfloat16", "float16"), default="auto")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--tasks", default="all", help="comma-separated tasks or families (niah_single, vt, ...) or all")
    ev.add_argument("--lengths", default="4k", help="comma-separated lengths in tokens (4096 or 4k)")
    ev.add_argument("--attention", default="star,global", help="comma-separated: star, global, ring")
    ev.add_argument("--block-size", default="1/4", help="comma-separated block sizes: tokens, or 1/k of the length")
    ev.add_argument("--anchor-size", default="block",
                    help="comma-separated anchor sizes: tokens, block, block/k, or 0 (no anchor)")
    ev.add_argument("--anchor-source", choices=("broadcast", "recompute"), default="broadcast")
    ev.add_argument("--backend", default="auto")
    ev.add_argument("--samples", type=int, default=4, help="samples per task and length")
    ev.add_argument("--max-new-tokens", type=int, help="override the per-task answer budget")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="runs/eval", help="results folder (a rerun resumes it)")
    ev.add_argument("--wandb", metavar="PROJECT", help="log to Weights & Biases (offline without an API key)")
    ev.add_argument("--collective-timeout-s", type=float, default=600.0)
    ev.add_argument("--decode-graphs", choices=DECODE_GRAPHS, default="auto",
                    help="decode steps as one CUDA graph per request (auto: in one process on CUDA)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars (weights loading, tasks)")
    return parser


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


def _everyone(group, step: str, fn):
    """Run ``fn`` on every rank; if it fails anywhere, raise the same error everywhere."""
    from .distributed.agreement import agree

    try:
        result, error = fn(), None
    except StarInputError as exc:
        result, error = None, str(exc)
    if group is None:
        if error:
            raise StarInputError(error)
        return result
    agree(group, step, {}, error)
    return result


def _same_everywhere(fn):
    """Run ``fn``, which depends only on the command line and the files it names (the same on every
    rank): an error it raises is the same on every rank, so one process reports it."""
    try:
        return fn()
    except StarInputError as exc:
        _everywhere(exc)
        raise


def _everywhere(exc: StarInputError) -> StarInputError:
    exc.on_every_rank = True  # as distributed.agreement marks the errors every rank raises alike
    return exc


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """transformers' progress bars (\"Loading weights\") on or off inside the block, as before after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _model_config(cfg):
    """``(directory, transformers config)`` of the run's model; reads no weights."""
    try:
        import transformers
    except ImportError:
        raise StarInputError("transformers is not installed: pip install 'star-sp[transformers]'") from None
    if not cfg.model:
        raise StarInputError("no model given: pass --model PATH or set model in --config")
    path = resolve_model(cfg.model, weights=not cfg.random_weights)
    try:
        return path, transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise StarInputError(f"cannot read the model config in {cfg.model}: {str(exc).splitlines()[0]}") from None


def _load_model(cfg, path: str, config, device: torch.device, progress: bool = True):
    import transformers

    dtype = _dtype(cfg.dtype, device)
    try:
        if cfg.random_weights:
            torch.manual_seed(cfg.seed)
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            with _progress_bars(progress):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
            model = model.to(device)
    except (OSError, ValueError, KeyError) as exc:
        raise StarInputError(f"cannot load a causal LM from {cfg.model}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a model directory without tokenizer files is legal
        return None


_SOURCES = {"context": ("--context-file", "--context-ids", "--random-context"),
            "query": ("--query-file", "--query-ids", "--random-query", "--query")}


def _read_ids(what: str, args, tokenizer, vocab: int, seed: int) -> list[int]:
    """The token ids of the context or the query, from the one source given for it."""
    text_file, ids_source, random_n = (getattr(args, f.lstrip("-").replace("-", "_")) for f in _SOURCES[what][:3])
    text = getattr(args, "query", None) if what == "query" else None
    given = [f for f, v in zip(_SOURCES[what], (text_file, ids_source, random_n, text)) if v is not None]
    if len(given) != 1:
        flags = ", ".join(_SOURCES[what][:-1]) + " or " + _SOURCES[what][-1]
        raise StarInputError(f"give exactly one {what} source ({flags}); got "
                             + (" and ".join(given) if given else "none"))
    source = given[0]
    if random_n is not None:
        if random_n < 1:
            raise StarInputError(f"{source} must be a positive number of tokens, got {random_n}")
        gen = torch.Generator().manual_seed(seed + (0 if what == "context" else 1))
        return torch.randint(0, vocab, (random_n,), generator=gen).tolist()
    if ids_source is not None:
        if what == "context":
            source = f"--context-ids file {ids_source}"
            ids_source = _read_file(ids_source, "--context-ids")
        try:
            ids = [int(t) for t in ids_source.split()]
        except ValueError:
            raise StarInputError(f"{source}: token ids must be whitespace-separated integers") from None
        if not ids:
            raise StarInputError(f"the {what} is empty: {source} holds no token ids")
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise StarInputError(f"{source}: token id {bad} is outside the model's vocabulary of {vocab} ids "
                                 f"(0 to {vocab - 1}); give ids of this model's tokenizer")
        return ids
    if tokenizer is None:
        raise StarInputError(f"the model directory has no tokenizer, so {what} text cannot be read; add "
                             "tokenizer files to it or pass token ids (--context-ids / --query-ids)")
    if text_file is not None:
        text = _read_file(text_file, source)
        if what == "query":  # an editor's final newline is no part of the question (as with "$(cat FILE)")
            text = text.rstrip("\r\n")
        source = f"{source} {text_file}"
    encoded = tokenizer(text, add_special_tokens=what == "context", return_special_tokens_mask=True)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    if not text.strip() or all(special):  # blank, or nothing but the tokenizer's own BOS/EOS
        raise StarInputError(f"the {what} is empty: {source} holds no text; give it the text to "
                             + ("answer from" if what == "context" else "ask"))
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise StarInputError(f"the tokenizer gives token id {bad} for the {what}, outside the model's vocabulary "
                             f"of {vocab} ids: the tokenizer does not belong to this model")
    return ids


def _read_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise StarInputError(f"cannot read {flag}: {exc}") from None


def _inputs(args, cfg, tokenizer, vocab: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 reads the inputs; every rank gets the same ids (or the same error)."""
    payload: list = [None]
    if group is None or dist.get_rank(group) == 0:
        try:
            ctx = _read_ids("context", args, tokenizer, vocab, cfg.seed)
            qry = _read_ids("query", args, tokenizer, vocab, cfg.seed)
            payload = [(ctx, qry, None)]
        except StarInputError as exc:
            payload = [(None, None, str(exc))]
    if group is not None:
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    ctx, qry, error = payload[0]
    if error:
        raise _everywhere(StarInputError(error))
    return torch.tensor([ctx]), torch.tensor([qry])


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def generate(args) -> int:
    from .distributed.process_group import init_from_env
    from .runconfig import RunConfig

    overrides = {k: getattr(args, k, None) for k in (
        "model", "random_weights", "dtype", "device", "attention", "block_size", "anchor_size", "anchor_source",
        "phase2_merge", "backend", "collective_timeout_s", "decode_graphs", "max_new_tokens", "do_sample",
        "temperature", "top_p", "top_k", "seed", "stop")}
    cfg = _same_everywhere(lambda: RunConfig.load(args.config, overrides))
    group, device, created = init_from_env(cfg.collective_timeout_s, cfg.device)
    try:
        return _generate(args, cfg, group, device)
    finally:
        if created:
            dist.destroy_process_group()


def _generate(args, cfg, group, device) -> int:
    from .integrations.transformers import StarEngine

    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    show = _speaks(rank) and not args.quiet and not args.json
    path, config = _everyone(group, "model config", lambda: _model_config(cfg))
    tokenizer = _load_tokenizer(path)
    context_ids, query_ids = _inputs(args, cfg, tokenizer, config.vocab_size, group)  # before the weights load
    model = _everyone(group, "load model", lambda: _load_model(cfg, path, config, device, progress=show))
    engine = _everyone(group, "engine", lambda: StarEngine(model, cfg.star_config(), group, attention=cfg.attention))
    if args.warmup:
        engine.generate(engine.prefill(context_ids), query_ids, cfg.max_new_tokens, sampling=cfg.sampling())
    context = engine.prefill(context_ids, progress=_Progress(show, f"prefill {context_ids.shape[1]} tokens"))
    prefill_s = engine.stats["prefill_s"]
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    tokens = engine.generate(context, query_ids, cfg.max_new_tokens, sampling=cfg.sampling(), eos_token_id=eos,
                             stop_strings=cfg.stop or None, tokenizer=tokenizer if cfg.stop else None)
    stats = dict(engine.stats, prefill_s=prefill_s, peak_memory_gb=_peak_memory_gb(device), world_size=world,
                 attention=cfg.attention, block_size=cfg.block_size, anchor_size=cfg.anchor_size or cfg.block_size)
    if rank == 0:
        ids = tokens[0].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None
        stats = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in stats.items()}
        if args.json:  # a stat that cannot be measured (decode speed of one new token) is null
            print(json.dumps({"tokens": ids, "text": text, **stats}, allow_nan=False))
        else:
            print(text if text is not None else " ".join(map(str, ids)))
            print(_stats_line(cfg, world, context_ids.shape[1], stats), file=sys.stderr)
    return 0


def _stats_line(cfg, world: int, context_len: int, stats: dict) -> str:
    """The one-line timing summary; a stat that is None (not measurable) reads n/a."""
    def num(key, fmt):
        return "n/a" if stats.get(key) is None else format(stats[key], fmt)

    speed = stats.get("decode_tokens_per_s")
    decode = f"{speed:.1f} tokens/s" if speed is not None else \
        f"decode speed n/a ({stats.get('new_tokens', 0)} new token(s))"
    sizes = f", block {cfg.block_size}, anchor {stats['anchor_size']}" if cfg.attention == "star" else ""
    return (f"[star-sp] {cfg.attention} attention, {world} process(es), context {context_len} tokens{sizes}: "
            f"prefill {num('prefill_s', '.3f')} s, "
            f"first token {num('first_token_s', '.3f')} s, {decode}, "
            f"peak memory {num('peak_memory_gb', '.2f')} GB (rank 0)")


def evaluate(args) -> int:
    from .config import StarConfig
    from .distributed.process_group import init_from_env
    from .eval import runner
    from .eval.plots import write_plots
    from .eval.tasks import resolve_tasks
    from .integrations.transformers import StarEngine
    from .runconfig import RunConfig
    from .tracking import Tracker

    split = lambda text: [x for x in text.split(",") if x.strip()]  # noqa: E731

    def parse():
        if args.samples < 1:
            raise StarInputError(f"--samples must be a positive integer, got {args.samples}")
        return (resolve_tasks(split(args.tasks)), [runner.parse_length(x) for x in split(args.lengths)],
                runner.parse_methods(split(args.attention), split(args.block_size), split(args.anchor_size)),
                RunConfig(model=resolve_model(args.model), dtype=args.dtype, device=args.device, seed=args.seed))

    tasks, lengths, methods, cfg = _same_everywhere(parse)
    args.model = cfg.model
    group, device, created = init_from_env(args.collective_timeout_s, cfg.device)
    try:
        rank = dist.get_rank(group) if group is not None else 0
        path, config = _everyone(group, "model config", lambda: _model_config(cfg))
        model = _everyone(group, "load model",
                          lambda: _load_model(cfg, path, config, device, progress=_speaks(rank) and not args.quiet))

        def need_tokenizer():
            tok = _load_tokenizer(args.model)
            if tok is None:
                raise StarInputError(f"{args.model} has no tokenizer files; star-sp eval writes its tasks as text "
                                     "and needs the model's tokenizer")
            budget = max(runner.answer_budget(t, args.max_new_tokens) for t in tasks)
            limit = getattr(model.config, "max_position_embeddings", None)
            if limit is not None and max(lengths) + budget > limit:
                raise StarInputError(f"length {max(lengths)} plus {budget} answer tokens exceeds the model's "
                                     f"{limit} positions; use shorter --lengths")
            return tok

        tokenizer = _everyone(group, "tokenizer", need_tokenizer)

        def make_engine(method, length):
            block, anchor = method.sizes(length)
            star = StarConfig(block_size=block, anchor_size=anchor, anchor_source=args.anchor_source,
                              backend=args.backend, collective_timeout_s=args.collective_timeout_s,
                              decode_graphs=args.decode_graphs)
            # global attention is the plain model in one process: under a launcher every rank runs it alone
            return StarEngine(model, star, None if method.attention == "global" else group, attention=method.attention)

        config = {"model": args.model, "tasks": tasks, "lengths": lengths, "methods": [m.name for m in methods],
                  "samples": args.samples, "seed": args.seed, "anchor_source": args.anchor_source,
                  "world_size": dist.get_world_size(group) if group is not None else 1}
        if args.wandb:
            _everyone(group, "wandb", Tracker.require)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        tracker = Tracker(args.wandb, config, args.out, enabled=rank == 0)

        def share(obj):
            if group is None:
                return obj
            box = [obj]
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
            return box[0]

        settings = {"model": os.path.abspath(args.model), "dtype": args.dtype, "seed": args.seed,
                    "anchor_source": args.anchor_source, "backend": args.backend,
                    "max_new_tokens": args.max_new_tokens}
        summary = runner.run(make_engine=make_engine, tokenizer=tokenizer, tasks=tasks, lengths=lengths,
                             methods=methods, samples=args.samples, out_dir=args.out, seed=args.seed,
                             is_writer=rank == 0, max_new_tokens=args.max_new_tokens, progress=not args.quiet,
                             on_row=tracker.log_row, settings=settings, share=share)
        if rank == 0:
            plots = write_plots(summary, args.out)
            table = runner.markdown_table(summary)
            tracker.log_summary(summary, table, plots)
            tracker.finish()
            print(table)
            print(f"\nresults: {os.path.join(args.out, 'results.jsonl')}\nplots: {', '.join(plots)}"
                  + (f"\nW&B run: {tracker.directory}" if tracker.directory else ""))
            print(f"summary: {os.path.join(args.out, 'summary.md')}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one line for a bad flag, printed once under a launcher (every rank parses the same
    command line)."""

    def error(self, message: str):
        _report(f"{self.prog}: error: {message} (see {self.prog} --help)", everywhere=True)
        raise SystemExit(2)


def _rank() -> int:
    """This process's rank: in the process group, else the launcher's RANK, else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _speaks(rank: int) -> bool:
    """Whether this process prints what every process knows: the first process of its host."""
    return int(os.environ.get("LOCAL_RANK", rank)) == 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def _report(line: str, *, everywhere: bool) -> None:
    """Print ``line`` on stderr: once when every rank has the same line, else on each rank, marked with
    its rank. Under torchrun the line also goes to this rank's error file, which torchrun shows as the
    root cause at the end of its failure report."""
    rank = _rank()
    if not everywhere and _world() > 1:
        line = line.replace("star-sp:", f"star-sp (rank {rank}):", 1)
    if not everywhere or _speaks(rank):
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            json.dump(record, f)


def _interrupted(signum, frame) -> None:
    _report("star-sp: interrupted", everywhere=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(130)


@contextlib.contextmanager
def _exit_on_interrupt():
    """Ctrl-C ends the command at once: one line, exit code 130, on every rank. A handler that exits,
    not the usual KeyboardInterrupt: that exception can be lost (raised inside a ``__del__`` it is only
    printed) and a rank that goes on alone keeps its peers waiting until the launcher kills them."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started to ignore Ctrl-C (nohup, cmd &): keep it so
            raise ValueError
        previous = signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # that, or not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    """``star-sp COMMAND``: 0 on success, 1 on an error (one line on stderr), 2 for a bad flag, 130 on
    Ctrl-C."""
    with _exit_on_interrupt():
        args = build_parser().parse_args(argv)
        try:
            return {"generate": generate, "eval": evaluate}[args.command](args)
        except StarError as exc:
            _report(f"star-sp: error: {exc}", everywhere=getattr(exc, "on_every_rank", False))
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
