"""The evaluation runner behind ``star-sp eval``: tasks x lengths x methods, resumable.

Every rank runs the same engine calls (one process per host); rank 0 alone writes. Results go to
``OUT/results.jsonl`` (one row per sample and method, appended as they finish) and, at the end,
``OUT/summary.md`` and ``OUT/summary.json`` (mean score per task x length x method, the family
averages, and each star method's ratio to global). A rerun skips the rows already written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import StarInputError
from .scoring import score
from .tasks import FAMILIES, generate

# How many new tokens each task needs for its answer (RULER's budgets, shortened for short answers); a
# sample whose reference answer takes more of the model's tokens gets that many plus a margin.
MAX_NEW_TOKENS = {"vt": 30, "cwe": 80, "fwe": 30, "qa": 16, "niah_multivalue": 64, "niah_multiquery": 64,
                  "niah_single_3": 64, "niah_multikey_3": 64}
DEFAULT_NEW_TOKENS = 32
MARGIN_TOKENS = 8


def answer_budget(task: str, override: int | None = None, answer_tokens: int = 0) -> int:
    """New tokens allowed for one answer of ``task``: ``override`` if given, else the task's budget,
    raised to ``answer_tokens`` (the reference answer in the model's tokens) plus a margin so that a
    correct answer is never cut short (generation stops at EOS anyway)."""
    return override or max(MAX_NEW_TOKENS.get(task, DEFAULT_NEW_TOKENS), answer_tokens + MARGIN_TOKENS)


EXACT = ("global", "ring")  # methods that compute full causal attention (no block, no anchor)


@dataclass(frozen=True)
class Method:
    """``global`` or ``ring`` (exact), or ``star`` with a block and an anchor given as specs that may depend on the length:
    block ``2048`` or ``1/4`` (a quarter of the length); anchor ``512``, ``block``, ``block/4`` or ``0``
    (no anchor at all)."""

    attention: str
    block: str = ""
    anchor: str = ""

    @property
    def name(self) -> str:
        return self.attention if self.attention in EXACT else f"star_b{self.block}_a{self.anchor}"

    def sizes(self, length: int) -> tuple[int, int]:
        """``(block_size, anchor_size)`` in tokens at this length."""
        if self.attention in EXACT:
            return length, length
        block = length // int(self.block[2:]) if self.block.startswith("1/") else int(self.block)
        if self.anchor == "block":
            anchor = block
        elif self.anchor.startswith("block/"):
            anchor = block // int(self.anchor[6:])
        else:
            anchor = int(self.anchor)
        return block, anchor


def parse_methods(attention: list[str], blocks: list[str], anchors: list[str]) -> list[Method]:
    """Methods from ``--attention``, ``--block-size`` and ``--anchor-size`` lists (star: every block x
    anchor pair)."""
    methods = []
    for att in attention:
        if att in EXACT:
            methods.append(Method(att))
        elif att == "star":
            if not blocks:
                raise StarInputError("star attention needs --block-size (tokens, or 1/k of the length)")
            for b in blocks:
                for a in anchors or ["block"]:
                    m = Method("star", b.strip(), a.strip())
                    try:
                        blk, anc = m.sizes(1 << 20)
                    except (ValueError, ZeroDivisionError):
                        raise StarInputError(f"block size {b!r} or anchor size {a!r} is not understood: use 2048 or "
                                             "1/4 for blocks, 512, block, block/4 or 0 for anchors") from None
                    if blk <= 0 or anc < 0:
                        raise StarInputError(f"block {b!r} and anchor {a!r} must give positive sizes")
                    methods.append(m)
        else:
            raise StarInputError(f"attention must be star, global or ring, got {att!r}")
    return methods


def parse_length(text: str) -> int:
    """``4096``, ``4k`` or ``4K`` -> tokens (k = 1024)."""
    t = text.strip().lower()
    try:
        return int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise StarInputError(f"lengths are token counts like 4096 or 4k, got {text!r}") from None


def _row_key(row: dict) -> tuple:
    return row["task"], row["length"], row["index"], row["method"]


def load_done(path: str) -> dict[tuple, dict]:
    done: dict[tuple, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by an interrupted run: that sample runs again
                    done[_row_key(row)] = row
    return done


def summarize(rows: list[dict]) -> dict:
    """Mean scores per (task, length, method), per (family, length, method), and star/global ratios."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        cells[(row["task"], row["length"], row["method"])].append(row["score"])
    by_task = {f"{t}|{n}|{m}": sum(v) / len(v) for (t, n, m), v in cells.items()}
    family_of = {t: fam for fam, ts in FAMILIES.items() for t in ts}
    fam_cells: dict[tuple, list[float]] = defaultdict(list)
    for (t, n, m), v in cells.items():
        fam_cells[(family_of.get(t, t), n, m)].append(sum(v) / len(v))
    by_family = {f"{f}|{n}|{m}": sum(v) / len(v) for (f, n, m), v in fam_cells.items()}
    methods = sorted({m for _, _, m in cells})
    lengths = sorted({n for _, n, _ in cells})
    per_setting: dict[tuple, list[float]] = defaultdict(list)  # (length, method) -> family means
    for (_, n, m), v in fam_cells.items():
        per_setting[(n, m)].append(sum(v) / len(v))
    average = {f"{n}|{m}": sum(v) / len(v) for (n, m), v in per_setting.items()}
    ratios = {}
    for key, value in average.items():
        n, m = key.split("|")
        base = average.get(f"{n}|global")
        if m != "global" and base:
            ratios[key] = value / base
    return {"by_task": by_task, "by_family": by_family, "average": average, "ratio_to_global": ratios,
            "methods": methods, "lengths": lengths}


def markdown_table(summary: dict) -> str:
    methods, lengths = summary["methods"], summary["lengths"]
    head = "| family | " + " | ".join(f"{m} @ {n}" for n in lengths for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + len(methods) * len(lengths))]
    families = sorted({k.split("|")[0] for k in summary["by_family"]})
    for fam in families + ["average"]:
        cells = []
        for n in lengths:
            for m in methods:
                key = f"{n}|{m}" if fam == "average" else f"{fam}|{n}|{m}"
                value = (summary["average"] if fam == "average" else summary["by_family"]).get(key)
                cells.append("" if value is None else f"{value:.1f}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    if summary["ratio_to_global"]:
        lines.append("")
        lines.append("star / global (average): " + ", ".join(
            f"{k.split('|')[1]} @ {k.split('|')[0]}: {v:.3f}" for k, v in sorted(summary["ratio_to_global"].items())))
    return "\n".join(lines)


def run(*, make_engine: Callable[[Method, int], object], tokenizer, tasks: list[str], lengths: list[int],
        methods: list[Method], samples: int, out_dir: str, seed: int = 0, is_writer: bool = True,
        max_new_tokens: int | None = None, progress: bool = True, on_row: Callable[[dict], None] | None = None,
        settings: dict | None = None, share: Callable[[object], object] | None = None, batch: int = 1,
        chat: tuple[str, str] | None = None) -> dict:
    """Evaluate every (task, length, sample, method) not already in ``out_dir/results.jsonl``.

    ``chat``: the chat template's ``(head, tail)`` (``prompt_parts``), each sample one user turn of it: the
    head and the context are the context (phase 1), the question and the tail up to the assistant's turn
    the query (phase 2); None: the text as is.

    ``batch``: samples of one task and length answered together, per method: their contexts (of
    different lengths) prefilled one after another into one batch and their questions decoded together
    (``StarEngine.prefill`` of a list); each answer is what the sample gets alone. The rows' timings are
    then the batch's (``batch`` says how many shared them).

    ``settings`` (model, seed, anchor source, ...) are kept in ``out_dir/settings.json``: resuming a
    folder made with other settings is refused. ``share(obj)`` returns the writer's ``obj`` on every
    rank (one process per host): the writer alone reads the folder, so every rank skips the same rows.
    """
    results_path = os.path.join(out_dir, "results.jsonl")
    settings_path = os.path.join(out_dir, "settings.json")
    state = None
    if is_writer:
        done, error = load_done(results_path), None
        if os.path.exists(settings_path) and settings is not None:
            with open(settings_path) as f:
                old = json.load(f)
            for key, before in (("prompt", "plain"), ("template", None)):  # folders made before these keys
                if key in settings and key not in old:
                    old[key] = before
            if old != json.loads(json.dumps(settings)):
                error = (f"{out_dir} holds results made with other settings ({old}); use another --out, or the "
                         f"same settings to resume")
        state = (done, error)
    if share is not None:
        state = share(state)
    done, error = state
    if error:
        exc = StarInputError(error)
        exc.on_every_rank = True  # every rank has the writer's verdict: one process reports it
        raise exc
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
        if settings is not None:
            with open(settings_path, "w") as f:
                json.dump(settings, f, indent=1)
        if os.path.exists(results_path) and os.path.getsize(results_path):
            with open(results_path, "rb+") as f:  # a run cut off mid-line: start the next row on a new line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    eos = tokenizer.eos_token_id
    head, tail = chat or ("", "")
    engines: dict[tuple, object] = {}
    for task in tasks:
        for length in lengths:
            label = f"{task} @ {length}"
            total = samples * len(methods)
            finished = 0
            start = time.perf_counter()
            made: dict[int, tuple] = {}  # index -> (sample, context ids, query ids, new tokens)

            def make(index: int):
                if index not in made:
                    sample = generate(task, length, index, count, seed)
                    ctx = torch.tensor([tokenizer(head + sample.context, add_special_tokens=not chat)["input_ids"]])
                    qry = torch.tensor([tokenizer(sample.query + tail, add_special_tokens=False)["input_ids"]])
                    new = answer_budget(task, max_new_tokens, count(" " + ", ".join(sample.answers) + "."))
                    made[index] = (sample, ctx, qry, new)
                return made[index]

            for first in range(0, samples, batch):
                chunk = range(first, min(samples, first + batch))
                for method in methods:
                    todo = [i for i in chunk if (task, length, i, method.name) not in done]
                    finished += len(chunk) - len(todo)
                    if not todo:
                        continue
                    items = [make(i) for i in todo]
                    engine = engines.get((method, length)) or engines.setdefault((method, length),
                                                                                make_engine(method, length))
                    predictions = _answer(engine, items, eos)
                    sizes = method.sizes(length)
                    for i, (sample, ctx, _, _), prediction in zip(todo, items, predictions):
                        text = tokenizer.decode(prediction, skip_special_tokens=True)
                        row = {"task": task, "length": length, "index": i, "method": method.name,
                               "attention": method.attention, "block_size": sizes[0],
                               "anchor_size": sizes[1], "context_tokens": int(ctx.shape[1]),
                               "prediction": text, "answers": list(sample.answers), "metric": sample.metric,
                               "score": score(text, sample.answers, sample.metric),
                               "prefill_s": engine.stats.get("prefill_s"), "generate_s": engine.stats.get("generate_s"),
                               "batch": len(todo)}
                        done[(task, length, i, method.name)] = row
                        if is_writer:
                            with open(results_path, "a") as f:
                                f.write(json.dumps(row) + "\n")
                        if on_row is not None:
                            on_row(row)
                        finished += 1
                        if progress and is_writer:
                            _bar(label, finished, total, start)
            if progress and is_writer:
                sys.stderr.write("\n")
    names = {m.name for m in methods}
    rows = [done[k] for k in sorted(done) if k[0] in tasks and k[1] in lengths and k[2] < samples and k[3] in names]
    return write_summary(rows, out_dir) if is_writer else summarize(rows)


CHAT_DATE = "26 Jul 2024"
"""The date a chat template that writes one is given (``chat_parts``), so prompts do not change by day."""


def template_id(head: str, tail: str) -> str:
    """A short fingerprint of a chat template's parts (kept in an eval folder's settings)."""
    import hashlib

    return hashlib.sha1((head + "\x00" + tail).encode()).hexdigest()[:12]


def prompt_parts(tokenizer, prompt: str) -> tuple[str, str] | None:
    """What ``--prompt`` asks of this tokenizer: ``chat``, its chat template's ``(head, tail)``
    (``chat_parts``); ``plain``, None; ``auto``, the template's where the tokenizer has one."""
    if prompt == "chat" or (prompt == "auto" and getattr(tokenizer, "chat_template", None)):
        return chat_parts(tokenizer)
    return None


def chat_parts(tokenizer) -> tuple[str, str]:
    """``(head, tail)``: the tokenizer's chat template around one user message, ending where the
    assistant's answer begins (``head + message + tail``). One line if the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise StarInputError("--prompt chat needs a tokenizer with a chat template; this one has none (use --prompt "
                             "plain)")
    marker = "\x00STAR-SP-MESSAGE\x00"
    # a fixed date for templates that write today's (Llama 3.x): the same prompt on every rank and every day
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True, date_string=CHAT_DATE)
    if text.count(marker) != 1:
        raise StarInputError("the tokenizer's chat template does not keep the user's message as given; use "
                             "--prompt plain")
    head, tail = text.split(marker)
    return head, tail


def _answer(engine, items: list[tuple], eos) -> list[list[int]]:
    """Each item's ``(sample, context ids, query ids, new tokens)`` answer tokens, cut at its own budget."""
    if len(items) == 1:
        _, ctx, qry, new = items[0]
        return [engine.generate(engine.prefill(ctx), qry, new, eos_token_id=eos)[0].tolist()]
    context = engine.prefill([ctx for _, ctx, _, _ in items])
    tokens = engine.generate(context, [qry[0] for _, _, qry, _ in items], max(new for *_, new in items),
                             eos_token_id=eos)
    return [tokens[j, :new].tolist() for j, (*_, new) in enumerate(items)]


def write_summary(rows: list[dict], out_dir: str) -> dict:
    """Summarize ``rows`` into ``out_dir/summary.json`` and ``summary.md``; returns the summary."""
    summary = summarize(rows)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown_table(summary) + "\n")
    return summary


def _bar(label: str, done: int, total: int, start: float) -> None:
    width = 24
    filled = width * done // max(1, total)
    sys.stderr.write(f"\r{label:28s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                     f"{time.perf_counter() - start:6.1f}s")
    sys.stderr.flush()
