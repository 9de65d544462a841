"""Many questions over one context (Q questions answered together against one at a time), and a mixed
batch of contexts of different lengths (one question each, answered together against one request at a
time), one GPU.

    python tools/bench_queries.py --contexts 128k --queries 1,8,32 --question-tokens 16 --new-tokens 64 \
        --out runs/bench-queries 2>&1 | tail -20                                   # one H200, ~2.5-3 minutes
    python tools/bench_queries.py --mixed 8k,16k,24k,32k,40k,48k,56k,64k --question-tokens 16 \
        --new-tokens 64 --out runs/bench-mixed 2>&1 | tail -12                     # one H200, ~2-2.5 minutes
    python tools/bench_queries.py --model DIR --dtype float32 --contexts 256 --queries 1,3 \
        --question-tokens 4 --new-tokens 3 --block 64 --warmup 64 --out /tmp/bq    # CPU smoke run

Model: ``tools/bench.py``'s, a Llama-3.1-8B-shaped model (``configs/models/llama-3.1-8b``) with random
bf16 weights. Inputs: one context ``(1, L)`` of random ids per ``--contexts`` length and ``max Q``
questions ``(max Q, --question-tokens)`` of random ids; a run with ``Q`` questions asks the first ``Q``.
Every question gets exactly ``--new-tokens`` greedy tokens (no EOS: the weights are random, nothing
may stop early). Methods (``--methods``):

- ``star``: ``StarEngine`` (``--block`` x ``--anchor``, default ``1/4`` x ``block``), the context
  prefilled once (batch 1), then ONE ``generate(context, questions (Q, Lq), new)``: the Q questions
  decode together, each step reading the context's KV once for all of them;
- ``star-one-at-a-time``: the same prefilled context, Q ``generate`` calls of one question each,
  their times summed;
- ``engine-global``: ``StarEngine(attention="global")``, its own prefill, then the Q questions together;
- ``global``: the plain transformers model's ``generate`` (SDPA, its dynamic cache) on a batch of Q
  rows, each the context followed by one question: the context is repeated Q times. Skipped where its
  KV cache alone would need more than ``--plain-max-gb`` (recorded as ``skipped: needs N GB``).

Each engine is warmed up first (a ``--warmup``-token context, the same question counts and new tokens;
for star the block and anchor specs applied to that length), the plain model once (2 tokens). Decoding
runs with ``--decode-graphs`` (``auto``: one CUDA graph per request on one GPU; its capture time is
``setup_s``, outside the decode rate). Per row: ``prefill_s`` (the engines: the context, once, shared
by every row of that method and context; ``global``: none apart, see ``first_token_s``),
``generate_s`` = time to answer all Q questions after the prefill (``global``: its whole ``generate``,
which prefills the Q contexts too), ``total_s`` = both, ``first_token_s`` (engines: the questions'
pass; ``global``: prefill of the Q contexts and questions), ``decode_tokens_per_s`` = the aggregate
decode rate ``Q x (new - 1) / decode_s`` (decode_s: after the first token, without graph capture,
as ``engine.stats`` counts it; one at a time: the calls' decode times summed), ``vs_q1`` = that rate
over the rate of the same method and context at Q = 1 (the target: star at Q = 32 >= 20), peak GiB of
the answer (``peak_gb``, the context KV and weights included) and of the prefill (``prefill_peak_gb``),
and ``tokens_sha`` (a checksum of the tokens; ``star-one-at-a-time`` rows also say whether theirs equal
the batched ``star`` tokens, ``same_tokens_as_batched``). Results: ``OUT/bench.json`` (rows with
hardware, versions, date and command) and ``OUT/bench.md``; a row that runs out of memory is recorded
as such and the run goes on.

A context that would leave no room for a question and its new tokens in the model's positions is
shortened to fit (128K = 131072 becomes 130992 on Llama-3.1-8B), said so on the console; rows carry
the length that ran.

Time of the first command on one H200 (an estimate from docs/benchmarks.md's 128K figures: star
prefill 8.4 s with 32K blocks, global 11.8 s, decode 14 ms per token through a graph with a 0.2-0.4 s
capture, the plain model's ``generate`` 83 ms per token): start and random weights ~30 s; warm-ups at
8K ~10 s; star prefill ~9 s and three batched generates ~4 s; one at a time 1 + 8 + 32 requests of
~1.1 s (question pass, capture, 63 steps) ~45 s; engine-global prefill ~12 s and ~4 s of generates;
global at Q = 1 ~17 s (12 s prefill, 63 x 83 ms), Q = 8 and 32 skipped (KV 138 and 550 GB): about
2.5 minutes, well under 5.

Mixed batch (``--mixed``: a comma list of context lengths, as ``--contexts``, each shortened to fit as
above; given alone, no question-count run: ``--contexts`` then defaults to none). Context ``i`` is
``(1, L_i)`` random ids (seed ``--seed + i``), its question ``(1, --question-tokens)``; star's block and
anchor are the ``--block`` / ``--anchor`` specs at each context's own length (``1/4``: a quarter of each;
``StarEngine(sizes=...)``, since one ``StarConfig`` holds one block size). Methods, per engine:

- ``star`` / ``engine-global``: ``prefill([ctx_1, ..., ctx_S])`` (one after another, each with its own
  layout, into one context of S sequences), then ONE ``generate`` of the S questions ``(S, Lq)``, each
  row attending its own context's KV;
- ``star-one-at-a-time`` / ``engine-global-one-at-a-time``: the same contexts, each prefilled and its
  question answered alone, S requests whose times are summed (peaks: the largest).

``--methods``: ``star`` and ``star-one-at-a-time`` pick star's rows; ``engine-global`` gives both of its
rows; the plain model (``global``) takes no mixed batch (its ``generate`` would pad every row to the
longest) and is not run here. Each engine is warmed up once with both request shapes over the same
contexts scaled down to at most ``--warmup`` tokens (8K ... 64K: 1K ... 8K). Per row (``mixed_rows``
in ``bench.json``, a second table in ``bench.md``): ``contexts`` (S), ``lengths``, ``context_tokens``
(their sum), star's ``blocks`` and ``anchors``, ``prefill_s`` (the sum over the contexts),
``generate_s`` (time to answer all S after the prefill), ``total_s`` (both), ``first_token_s``,
``decode_tokens_per_s`` = ``S x (new - 1) / decode_s`` (the aggregate rate; ``decode_s`` as above),
``vs_one_at_a_time`` (on the batched rows: that rate over the one-at-a-time rate), ``peak_gb`` (the
answer, every context's KV held), ``prefill_peak_gb`` (the engine restarts the peak counter at each
context: for the batch, the last context's prefill with the KV of those before it), ``tokens_sha``,
and ``same_tokens_as_batched`` on the one-at-a-time rows.

Time of the mixed command on one H200 (an estimate from docs/benchmarks.md's one-GPU figures; no run
yet): 8 contexts of 8K-64K are 288K tokens of prefill per method, and each engine prefills them twice
(batched and one at a time). Global prefill ~1.42 s at 32K and ~3.73 s at 64K, i.e. about 0.98 s per
32K tokens plus 0.45 s x (L / 32K)^2: ~14.5 s for the eight; star with quarter blocks (anchor = block:
about 5/8 of global's attention; 3.28 s at 64K) ~12.5 s. Start and random weights ~30 s; warm-ups
(1K-8K contexts, 36K tokens, and two generates with graph capture) ~5 s per engine; star: 2 x 12.5 s of
prefill, one batched generate of 8 questions ~2 s (8 x 32 attention calls a step through one graph),
8 lone requests ~1.1 s each: ~36 s; engine-global: 2 x 14.5 s of prefill and the same answers: ~40 s.
About 2-2.5 minutes, under 5: the list of the issue (8K ... 64K) is kept as is. Peak memory: the eight
contexts' KV (288K tokens x 128 KiB = 36 GiB) and the weights (15 GiB), ~55-60 GiB.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/bench.py: model, ids, sizes, memory and provenance helpers)

from star_sp import StarConfig, StarEngine, StarError  # noqa: E402
from star_sp.config import DECODE_GRAPHS  # noqa: E402
from star_sp.eval.runner import parse_length  # noqa: E402

METHODS = ("star", "star-one-at-a-time", "engine-global", "global")


def _questions(count: int, tokens: int, vocab: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (count, tokens), generator=gen).to(device)


def _sha(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.detach().cpu().long().contiguous().numpy().tobytes()).hexdigest()[:16]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(queries: int, new_tokens: int, decode_s: float) -> float | None:
    """Aggregate decode tokens/s: every question's tokens after its first, over the decode time."""
    return queries * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None


def plain_kv_gb(cfg, queries: int, tokens: int, dtype: torch.dtype) -> float:
    """GB (1e9) of the plain model's KV cache for ``queries`` rows of ``tokens`` positions each."""
    _, kv, dim = bench._heads(cfg)
    return queries * tokens * cfg.num_hidden_layers * 2 * kv * dim * dtype.itemsize / 1e9


def _attempt(row: dict, fn):
    """``fn()``, or None with ``row["error"]`` set (out of memory, or an error's first line)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except (RuntimeError, StarError) as exc:
        row["error"] = str(exc).splitlines()[0][:120]
    return None


def engine_config(args, attention: str, length: int) -> StarConfig:
    """The engine's config for a context of ``length`` tokens: star's block and anchor from the ``--block``
    and ``--anchor`` specs at that length (``1/4``: a quarter of it); global takes no block."""
    block = bench._size(args.block, length, 1) if attention == "star" else length
    anchor = bench._size(args.anchor, length, 1, block) if attention == "star" else 0
    return StarConfig(block_size=block, anchor_size=anchor, backend=args.backend, decode_graphs=args.decode_graphs)


def answer_together(engine, context, questions: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """One ``generate`` for all questions ``(Q, Lq)`` over the prefilled ``context``."""
    bench._reset(engine.device)
    tokens = engine.generate(context, questions, new_tokens)
    s = engine.stats
    decode_s = s["generate_s"] - s["first_token_s"] - s["decode_setup_s"]
    return {"generate_s": s["generate_s"], "first_token_s": s["first_token_s"], "setup_s": s["decode_setup_s"],
            "decode_s": decode_s, "new_tokens": s["new_tokens"], "decode_mode": s["decode_mode"],
            "decode_tokens_per_s": _rate(len(questions), s["new_tokens"], decode_s),
            "peak_gb": bench._peak(engine.device)}, tokens


def answer_one_at_a_time(engine, context, questions: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """``Q`` ``generate`` calls of one question each over the same prefilled ``context``, summed."""
    return combine([answer_together(engine, context, q[None], new_tokens) for q in questions])


def combine(parts: list[tuple[dict, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
    """Requests run one after another as one row: their times summed, their peaks the largest, the
    aggregate rate every request's tokens after its first over the summed decode time, the tokens stacked."""
    stats = [p for p, _ in parts]
    total = {k: sum(p[k] for p in stats) for k in ("prefill_s", "generate_s", "first_token_s", "setup_s", "decode_s")
             if k in stats[0]}
    for key in ("peak_gb", "prefill_peak_gb"):
        if key in stats[0]:
            peaks = [p[key] for p in stats if p[key] is not None]
            total[key] = max(peaks) if peaks else None
    new = stats[-1]["new_tokens"]
    return {**total, "new_tokens": new, "decode_mode": stats[-1]["decode_mode"],
            "decode_tokens_per_s": _rate(len(parts), new, total["decode_s"])}, torch.cat([t for _, t in parts])


def answer_plain(model, context, questions: torch.Tensor, new_tokens: int, device) -> tuple[dict, torch.Tensor]:
    """The plain model's ``generate`` on ``Q`` rows ``[context ; question i]``; the time of each step's
    logits (a logits processor that synchronises) splits the first token from the decode."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from star_sp import _compat

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.times.append(time.perf_counter())
            return scores

    _compat.set_attn_implementation(model, "sdpa")
    ids = torch.cat([context.expand(len(questions), -1), questions], dim=1)
    clock = Clock()
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # random weights: every row runs all new tokens
    try:
        bench._reset(device)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        _sync(device)
        end = time.perf_counter()
    finally:
        model.generation_config.eos_token_id = eos
    tokens = out[:, ids.shape[1]:]
    decode_s = clock.times[-1] - clock.times[0]
    return {"generate_s": end - start, "first_token_s": clock.times[0] - start, "setup_s": 0.0,
            "decode_s": decode_s, "new_tokens": tokens.shape[1], "decode_mode": "transformers",
            "decode_tokens_per_s": _rate(len(questions), tokens.shape[1], decode_s),
            "peak_gb": bench._peak(device)}, tokens


def engine_rows(model, method: str, context, questions, counts, args, run_both: bool) -> list[dict]:
    """Rows of one engine (``star``, whose prefill ``star-one-at-a-time`` shares when ``run_both``, or
    ``engine-global``) at one context: warm-up, one prefill, then each question count."""
    length = context.shape[1]
    attention = "global" if method == "engine-global" else "star"
    config = functools.partial(engine_config, args, attention)
    methods = [method, "star-one-at-a-time"] if run_both else [method]
    cfg = config(length)
    common = {"context": length}
    if attention == "star":
        common.update(block=cfg.block_size, anchor=cfg.anchor_size)
    failed = {}
    warm_ids = context[:, : min(length, args.warmup)]

    def warm():
        warm_engine = StarEngine(model, config(warm_ids.shape[1]), attention=attention)
        warm_context = warm_engine.prefill(warm_ids)
        for q in sorted({1, max(counts)}):
            warm_engine.generate(warm_context, questions[:q], args.new_tokens)

    engine = StarEngine(model, cfg, attention=attention)

    def prefill():
        bench._reset(engine.device)
        ctx = engine.prefill(context)
        return ctx, engine.stats["prefill_s"], bench._peak(engine.device)

    result = _attempt(failed, lambda: (warm(), prefill())[1])
    ctx, prefill_s, prefill_peak = result if result else (None, None, None)
    rows = []
    for q in counts:
        batched_tokens = None
        for name in methods:
            row = {**common, "queries": q, "method": name, **failed}
            if "error" not in row:
                fn = answer_one_at_a_time if name == "star-one-at-a-time" else answer_together
                got = _attempt(row, lambda: fn(engine, ctx, questions[:q], args.new_tokens))
                if got:
                    stats, tokens = got
                    row.update(prefill_s=prefill_s, prefill_peak_gb=prefill_peak, **stats,
                               total_s=prefill_s + stats["generate_s"], tokens_sha=_sha(tokens))
                    if name == "star":
                        batched_tokens = tokens
                    elif name == "star-one-at-a-time":
                        row["same_tokens_as_batched"] = (None if batched_tokens is None
                                                         else bool(torch.equal(tokens, batched_tokens)))
            bench._reset(model.device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    del ctx
    bench._reset(model.device)
    return rows


def plain_rows(model, context, questions, counts, args, warm: list) -> list[dict]:
    """Rows of the plain model's ``generate`` at one context (``warm``: whether it has been warmed up)."""
    device = model.device
    length = context.shape[1]
    rows = []
    for q in counts:
        row = {"context": length, "queries": q, "method": "global"}
        need = plain_kv_gb(model.config, q, length + questions.shape[1] + args.new_tokens, model.dtype)
        if need > args.plain_max_gb:
            row["error"] = f"skipped: needs {need:.0f} GB of KV cache (over --plain-max-gb {args.plain_max_gb:g})"
        else:
            if not warm:
                _attempt(row, lambda: answer_plain(model, context[:, : min(length, args.warmup)], questions[:1], 2,
                                                   device))
                warm.append(True)
            got = _attempt(row, lambda: answer_plain(model, context, questions[:q], args.new_tokens, device))
            if got:
                stats, tokens = got
                row.update(prefill_s=None, prefill_peak_gb=None, **stats, total_s=stats["generate_s"],
                           tokens_sha=_sha(tokens))
        bench._reset(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def prefill_and_answer(engine, contexts, questions: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """Prefill ``contexts`` (a list of ``S`` contexts ``(1, L_i)``: one batch, each with its own layout;
    or one context ``(1, L)``) and answer ``questions (S, Lq)``, one per context, in one ``generate``."""
    bench._reset(engine.device)
    context = engine.prefill(contexts)
    prefill = {"prefill_s": engine.stats["prefill_s"], "prefill_peak_gb": bench._peak(engine.device)}
    stats, tokens = answer_together(engine, context, questions, new_tokens)
    return {**prefill, **stats}, tokens


def mixed_rows(model, method: str, contexts: list, questions: torch.Tensor, args, together: bool, alone: bool
               ) -> list[dict]:
    """Rows of one engine (``star`` or ``engine-global``) over the mixed batch, after one warm-up of
    both request shapes: ``method`` (the S contexts prefilled as one list, then one ``generate`` of the
    S questions) and ``method-one-at-a-time`` (each context prefilled and its question answered alone,
    the S requests' times summed)."""
    attention = "global" if method == "engine-global" else "star"
    config = functools.partial(engine_config, args, attention)
    lengths = [c.shape[1] for c in contexts]
    engine = StarEngine(model, config(max(lengths)), attention=attention,
                        sizes=lambda n: (config(n).block_size, config(n).anchor_size))
    common = {"contexts": len(contexts), "context_tokens": sum(lengths), "lengths": lengths}
    if attention == "star":
        common.update(blocks=[config(n).block_size for n in lengths], anchors=[config(n).anchor_size for n in lengths])
    top = max(lengths)  # the warm-up: the same contexts scaled down to at most --warmup tokens
    warm = [c[:, : max(1, c.shape[1] * min(top, args.warmup) // top)] for c in contexts]
    failed: dict = {}
    _attempt(failed, lambda: (prefill_and_answer(engine, warm, questions, args.new_tokens),
                              prefill_and_answer(engine, warm[0], questions[:1], args.new_tokens)))
    bench._reset(model.device)

    def each_alone():
        return combine([prefill_and_answer(engine, c, q[None], args.new_tokens) for c, q in zip(contexts, questions)])

    rows, batched = [], None
    for name in ([method] if together else []) + ([f"{method}-one-at-a-time"] if alone else []):
        row = {"method": name, **common, **failed}
        one = name.endswith("-one-at-a-time")
        if "error" not in row:
            got = _attempt(row, each_alone if one else lambda: prefill_and_answer(engine, contexts, questions,
                                                                                   args.new_tokens))
            if got:
                stats, tokens = got
                row.update(**stats, total_s=stats["prefill_s"] + stats["generate_s"], tokens_sha=_sha(tokens))
                if one:
                    row["same_tokens_as_batched"] = None if batched is None else bool(torch.equal(tokens, batched))
                else:
                    batched = tokens
        bench._reset(model.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def compare_to_alone(rows: list[dict]) -> None:
    """``vs_one_at_a_time`` on each batched mixed row: its aggregate decode rate over the rate of the same
    engine answering the same contexts one at a time (None on the one-at-a-time rows)."""
    rates = {r["method"]: r.get("decode_tokens_per_s") for r in rows}
    for r in rows:
        alone = rates.get(f"{r['method']}-one-at-a-time")
        rate = r.get("decode_tokens_per_s")
        r["vs_one_at_a_time"] = rate / alone if rate and alone else None


def _answer_cells(r: dict, ratio: str) -> str:
    """The cells both tables share, from the prefill to the peaks (``ratio``: the row's ratio key)."""
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    return (f"{fmt(r['prefill_s'])} | {fmt(r['generate_s'])} | {fmt(r['total_s'])} | {fmt(r['first_token_s'])} | "
            f"{fmt(r['decode_tokens_per_s'], 1)} | {fmt(r[ratio], 1)} | {r['decode_mode']} | "
            f"{fmt(r['peak_gb'], 1)} / {fmt(r['prefill_peak_gb'], 1)} |")


def _method(r: dict) -> str:
    same = r.get("same_tokens_as_batched")
    return r["method"] + ("" if same is None else (" (same tokens)" if same else " (OTHER TOKENS)"))


def mixed_table(rows: list[dict]) -> str:
    head = ("| method | S | context tokens | prefill s (sum) | answer all s | total s | first token s | "
            "decode tok/s (all S) | x one at a time | decode | peak GiB (answer / prefill) | tokens |")
    return _table(head, rows, lambda r: (_method(r), r["contexts"], r["context_tokens"]), "vs_one_at_a_time",
                  tail=lambda r: f" {r['tokens_sha']} |")


def mixed_summary(rows: list[dict]) -> str:
    """One line per engine: the batched aggregate decode rate over one at a time, and the times to answer all."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    out = []
    for method in ("star", "engine-global"):
        batch, alone = ok.get(method), ok.get(f"{method}-one-at-a-time")
        if batch and alone:
            out.append(f"mixed batch of {batch['contexts']} contexts ({batch['context_tokens']} tokens, "
                       f"{min(batch['lengths'])}-{max(batch['lengths'])} each): {method} decodes "
                       f"{batch['vs_one_at_a_time'] or float('nan'):.1f}x the aggregate rate of one at a time; answers "
                       f"all in {batch['generate_s']:.2f} s after the prefill against {alone['generate_s']:.2f} s, "
                       f"{batch['total_s']:.2f} s against {alone['total_s']:.2f} s with it")
    return "\n".join(out)


def compare_to_one(rows: list[dict]) -> None:
    """``vs_q1``: each row's aggregate decode rate over its method's at Q = 1 on the same context."""
    ones = {(r["context"], r["method"]): r.get("decode_tokens_per_s") for r in rows if r["queries"] == 1}
    for r in rows:
        base = ones.get((r["context"], r["method"]))
        rate = r.get("decode_tokens_per_s")
        r["vs_q1"] = rate / base if rate and base else None


def table(rows: list[dict]) -> str:
    head = ("| context | Q | method | prefill s | answer all s | total s | first token s | "
            "decode tok/s (all questions) | x Q=1 | decode | peak GiB (answer / prefill) |")
    return _table(head, rows, lambda r: (r["context"], r["queries"], _method(r)), "vs_q1")


def _table(head: str, rows: list[dict], lead, ratio: str, tail=lambda r: "") -> str:
    """A Markdown table: per row its ``lead(r)`` cells, then the error (the rest of the row empty) or the
    answer cells (``ratio``: the row's ratio key) and ``tail(r)``."""
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for r in rows:
        cells = lead(r)
        start = "| " + " | ".join(map(str, cells)) + " | "
        lines.append(start + (r["error"] + " |" * (columns - len(cells)) if "error" in r
                              else _answer_cells(r, ratio) + tail(r)))
    return "\n".join(lines)


def summary(rows: list[dict], target_q: int = 32, target: float = 20.0) -> str:
    """One line per context: star's aggregate decode rate at the largest Q over Q = 1 (the target:
    >= 20 at Q = 32), and its time to answer all against one at a time."""
    out = []
    for length in sorted({r["context"] for r in rows}):
        ok = {(r["method"], r["queries"]): r for r in rows if r["context"] == length and "error" not in r}
        qs = sorted(q for m, q in ok if m == "star")
        if not qs:
            continue
        q = qs[-1]
        star, alone = ok[("star", q)], ok.get(("star-one-at-a-time", q))
        ratio = star["vs_q1"] or float("nan")
        text = f"context {length}: star at Q = {q} decodes {ratio:.1f}x the aggregate rate of Q = 1"
        if q == target_q:
            text += f" (target >= {target:g}x: {'met' if (star['vs_q1'] or 0) >= target else 'NOT met'})"
        if alone:
            text += (f"; answers all {q} in {star['generate_s']:.2f} s after the prefill, one at a time in "
                     f"{alone['generate_s']:.2f} s ({alone['generate_s'] / star['generate_s']:.1f}x as long)")
        out.append(text)
    return "\n".join(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/models/llama-3.1-8b", help="a model config directory")
    p.add_argument("--contexts", default=None,
                   help="context lengths for the question counts (default 128k; none with --mixed alone)")
    p.add_argument("--queries", default="1,8,32", help="question counts Q, asked of one context")
    p.add_argument("--mixed", default="",
                   help="context lengths of one mixed batch (e.g. 8k,16k,...,64k): one question per context, "
                        "answered together against one request at a time")
    p.add_argument("--question-tokens", type=int, default=16, help="tokens of each question")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated for each question (no EOS)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--block", default="1/4", help="star block: 1/k of the context (of each one, --mixed), or tokens")
    p.add_argument("--anchor", default="block", help="star anchor: block, block/k, or tokens")
    p.add_argument("--plain-max-gb", type=float, default=120.0,
                   help="skip the plain model where its KV cache alone would need more GB (1e9)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=8192, help="context tokens of the untimed warm-up")
    p.add_argument("--decode-graphs", default="auto", choices=DECODE_GRAPHS,
                   help="the engines' StarConfig.decode_graphs (auto: a CUDA graph per request on one GPU)")
    p.add_argument("--out", default="runs/bench-queries")
    args = p.parse_args(argv)
    methods = bench.parse_methods(p, args.methods, METHODS)
    counts = sorted({int(q) for q in args.queries.split(",") if q})
    if not counts or counts[0] < 1 or args.question_tokens < 1 or args.new_tokens < 1:
        p.error("--queries, --question-tokens and --new-tokens must be positive")
    contexts = args.contexts if args.contexts is not None else ("" if args.mixed else "128k")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bench._model(args.model, device, getattr(torch, args.dtype), args.seed)
    vocab = model.config.vocab_size

    def fit(asked: int) -> int:
        length = bench.fit_context(asked, model.config, args.question_tokens, args.new_tokens)
        if length < 1:
            p.error(f"--question-tokens and --new-tokens leave no room for a context in the model's "
                    f"{model.config.max_position_embeddings} positions")
        if length != asked:
            print(f"context {asked} shortened to {length}: the context, a {args.question_tokens}-token question and "
                  f"{args.new_tokens} new tokens must fit the model's {model.config.max_position_embeddings} "
                  "positions", flush=True)
        return length

    questions = _questions(max(counts), args.question_tokens, vocab, args.seed + 1, device)
    rows: list[dict] = []
    plain_warm: list = []
    for asked in (parse_length(c) for c in contexts.split(",") if c):
        length = fit(asked)
        context = bench._ids(length, vocab, args.seed, device)
        if "star" in methods or "star-one-at-a-time" in methods:
            rows += engine_rows(model, "star" if "star" in methods else "star-one-at-a-time", context, questions,
                                counts, args, run_both="star" in methods and "star-one-at-a-time" in methods)
        if "engine-global" in methods:
            rows += engine_rows(model, "engine-global", context, questions, counts, args, run_both=False)
        if "global" in methods:
            rows += plain_rows(model, context, questions, counts, args, plain_warm)
    compare_to_one(rows)
    mixed: list[dict] = []
    asked_mixed = [parse_length(c) for c in args.mixed.split(",") if c]
    if asked_mixed:
        batch = [bench._ids(fit(n), vocab, args.seed + i, device) for i, n in enumerate(asked_mixed)]
        asks = _questions(len(batch), args.question_tokens, vocab, args.seed + 1, device)
        if "star" in methods or "star-one-at-a-time" in methods:
            mixed += mixed_rows(model, "star", batch, asks, args, together="star" in methods,
                                alone="star-one-at-a-time" in methods)
        if "engine-global" in methods:
            mixed += mixed_rows(model, "engine-global", batch, asks, args, together=True, alone=True)
        compare_to_alone(mixed)
    prov = bench._provenance(device, argv)
    prov["command"] = " ".join(["tools/bench_queries.py", *argv])
    settings = {"question_tokens": args.question_tokens, "new_tokens": args.new_tokens, "queries": counts,
                "mixed": asked_mixed, "block": args.block, "anchor": args.anchor, "decode_graphs": args.decode_graphs}
    report = "\n\n".join(part for part in (
        rows and f"{table(rows)}\n\n{summary(rows)}",
        mixed and f"Mixed batch: one question per context, answered together against one request at a time\n\n"
                  f"{mixed_table(mixed)}\n\n{mixed_summary(mixed)}") if part)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"provenance": prov, "settings": settings, "rows": rows, "mixed_rows": mixed}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"{report}\n\nOne process on {prov['device']}; {args.question_tokens}-token questions, "
                f"{args.new_tokens} new tokens each; torch {prov['torch']}, transformers {prov['transformers']}, "
                f"CUDA {prov['cuda']}; {prov['date']}; `{prov['command']}`\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
