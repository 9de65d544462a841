"""The ``star-sp`` command line: its flags and ``main``. ``star-sp generate --help`` explains every flag.

Runs in one process, or one process per host under ``torchrun`` / ``deepspeed`` (``launch/infer.py``).
Rank 0 reads the inputs and sends the token ids to every rank; a user error is raised on every rank and
ends every process with exit code 1 and one line, printed once (by the first process of each host);
Ctrl-C ends every process with exit code 130.

The commands are ``generate.py`` and ``evaluate.py``; they read ``--model`` with ``model_arg.py`` and
the token ids with ``inputs.py``; ``report.py`` turns errors and Ctrl-C into one line and an exit code.
"""

from __future__ import annotations

import argparse

from ..config import ANCHOR_SOURCES, ATTENTIONS, BACKENDS, DECODE_GRAPHS, DECODE_KERNELS, DTYPES, PHASE2_MERGES
from ..errors import StarError
from .evaluate import evaluate
from .generate import generate
from .report import exit_on_interrupt, report

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
                   "'reference' / 'reference-anchor' for the models shipped with star-sp, or 'smollm2' (a real "
                   "model from an optional package)")
    g.add_argument("--random-weights", action="store_true", default=None,
                   help="build the model from its config with random weights (for timings)")
    g.add_argument("--dtype", choices=DTYPES,
                   help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", help="auto (CUDA if present, one GPU per process), cpu, cuda, cuda:N")
    g = gen.add_argument_group("inputs (one context source and one query source)")
    g.add_argument("--context-file", help="text file holding the context")
    g.add_argument("--context-ids", help="file of whitespace-separated token ids (no tokenizer needed)")
    g.add_argument("--random-context", type=int, metavar="N", help="N random token ids (timings)")
    g.add_argument("--query", action="append", help="query text, appended after the context; give it several "
                   "times to ask several questions of the one context (decoded together)")
    g.add_argument("--questions-file", help="text file of questions, one per line, all asked of the one context")
    g.add_argument("--query-file", help="text file holding the query (its final newlines dropped)")
    g.add_argument("--query-ids", help="whitespace-separated token ids of the query")
    g.add_argument("--random-query", type=int, metavar="N", help="N random token ids as the query (timings)")
    g.add_argument("--prompt", choices=("auto", "plain", "chat"), default="auto",
                   help="chat: the context and question as one user turn of the tokenizer's chat template (an "
                        "instruct model's form); plain: the text as is; auto: chat where the tokenizer has a "
                        "template and both are text")
    g = gen.add_argument_group("star attention")
    g.add_argument("--attention", choices=ATTENTIONS,
                   help="star (default), the plain model (one process), or exact ring attention across the processes")
    g.add_argument("--block-size", type=int, help="context tokens per block (default 4096)")
    g.add_argument("--anchor-size", type=int, help="anchor tokens (default: the block size)")
    g.add_argument("--anchor-source", choices=ANCHOR_SOURCES,
                   help="broadcast the anchor's KV from the host of block 0 (default) or recompute it everywhere")
    g.add_argument("--phase2-merge", choices=PHASE2_MERGES,
                   help="merge hosts' query results by all-reduce (default) or all-gather (the paper's form)")
    g.add_argument("--backend", choices=BACKENDS,
                   help="attention kernel (auto picks the fastest that fits)")
    g.add_argument("--collective-timeout-s", type=float, help="seconds a collective may wait (default 600)")
    g.add_argument("--decode-graphs", choices=DECODE_GRAPHS,
                   help="decode steps as one CUDA graph per request (auto: in one process on CUDA)")
    g.add_argument("--decode-kernel", choices=DECODE_KERNELS,
                   help="a fixed-shape decode step's attention: torch (default) or triton (the context's KV and "
                        "the step's own in one split-KV pass; CUDA, not yet measured; several contexts of "
                        "different lengths in one batch decode with torch)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="fuse the model's element-wise work with torch.compile around Star's attention (compiled "
                        "once; the compile time is reported apart)")
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
                    help="model directory with tokenizer files, 'reference' / 'reference-anchor' for the models shipped with "
                         "star-sp, or 'smollm2' (a real model from an optional package)")
    ev.add_argument("--dtype", choices=DTYPES, default="auto")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--tasks", default="all", help="comma-separated tasks or families (niah_single, vt, ...) or all")
    ev.add_argument("--lengths", default="4k", help="comma-separated lengths in tokens (4096 or 4k)")
    ev.add_argument("--attention", default="star,global", help="comma-separated: star, global, ring")
    ev.add_argument("--block-size", default="1/4", help="comma-separated block sizes: tokens, or 1/k of the length")
    ev.add_argument("--anchor-size", default="block",
                    help="comma-separated anchor sizes: tokens, block, block/k, or 0 (no anchor)")
    ev.add_argument("--anchor-source", choices=ANCHOR_SOURCES, default="broadcast")
    ev.add_argument("--backend", default="auto")
    ev.add_argument("--samples", type=int, default=4, help="samples per task and length")
    ev.add_argument("--max-new-tokens", type=int, help="override the per-task answer budget")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="runs/eval", help="results folder (a rerun resumes it)")
    ev.add_argument("--wandb", metavar="PROJECT", help="log to Weights & Biases (offline without an API key)")
    ev.add_argument("--collective-timeout-s", type=float, default=600.0)
    ev.add_argument("--decode-graphs", choices=DECODE_GRAPHS, default="auto",
                    help="decode steps as one CUDA graph per request (auto: in one process on CUDA)")
    ev.add_argument("--decode-kernel", choices=DECODE_KERNELS, default="torch",
                    help="a fixed-shape decode step's attention: torch or triton (one split-KV pass; CUDA)")
    ev.add_argument("--compile", action="store_true",
                    help="fuse the model's element-wise work with torch.compile around Star's attention")
    ev.add_argument("--batch", type=int, default=8,
                    help="samples of one task and length answered together per method (their contexts prefilled "
                         "into one batch, their questions decoded together; the same answers as one by one)")
    ev.add_argument("--prompt", choices=("auto", "plain", "chat"), default="auto",
                    help="chat: each sample as a user turn of the tokenizer's chat template (the context in "
                         "phase 1, the question and the assistant's turn in phase 2; the template's tokens come "
                         "on top of --lengths); plain: the text as is; auto: chat where the tokenizer has a "
                         "template")
    ev.add_argument("--quiet", action="store_true", help="no progress bars (weights loading, tasks)")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one line for a bad flag, printed once under a launcher (every rank parses the same
    command line)."""

    def error(self, message: str):
        report(f"{self.prog}: error: {message} (see {self.prog} --help)", everywhere=True, exiting=True)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """``star-sp COMMAND``: 0 on success, 1 on an error (one line on stderr), 2 for a bad flag, 130 on
    Ctrl-C."""
    with exit_on_interrupt():
        args = build_parser().parse_args(argv)
        try:
            return {"generate": generate, "eval": evaluate}[args.command](args)
        except StarError as exc:
            report(f"star-sp: error: {exc}", everywhere=getattr(exc, "on_every_rank", False), exiting=True)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
