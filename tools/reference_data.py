"""Training data for the reference model (used by ``tools/train_reference.py``).

Three kinds of example, each a list of token ids with a per-token role (0 context, 1 answer):

- a **task** sample exactly as ``star-sp eval`` asks it (``star_sp.eval.tasks``), its answer appended;
- a **drill**: one task context asked several questions in a row (each ``query + answer + eos``), so a
  long context carries several answers' worth of signal; the first question is the evaluation's own;
- **prose**: plain generated text (every token a context token).

Samples are sized without searching: the filler amount comes from a per-task linear fit of tokens
against filler units, and text is tokenized through a cache of space-separated chunks (exact for the
byte-level BPE built here, checked at start-up by :func:`Encoder.check`).
"""

from __future__ import annotations

import random
import re

from star_sp.eval import TASKS, generate
from star_sp.eval import tasks as T
from star_sp.eval import text as prose

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
UNORDERED = ("niah_multivalue", "cwe")
DRILLS = {name for name in TASKS if name.startswith("niah") or name in ("vt", "qa")}


def build_tokenizer(vocab_size: int, seed: int):
    """Byte-level BPE trained on generated task text and prose; digits always split one by one; a
    context (``add_special_tokens=True``) starts with ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = lambda s: len(s.split())  # noqa: E731 - a cheap length for the tokenizer's corpus
    corpus = [prose.paragraph(rng) for _ in range(3000)]
    for task in TASKS:
        for i in range(40):
            sample = generate(task, 400, i, words, seed=seed + 1)
            corpus += [sample.context, sample.query + " " + ", ".join(sample.answers)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def answer_text(answers) -> str:
    return " " + ", ".join(answers) + "."


class Encoder:
    """Tokenizes by space-separated chunks through a cache: the byte-level pre-tokenizer never joins
    text across the position before a space, so the chunks' ids concatenate to the text's ids."""

    SPLIT = re.compile(r"(?= )")

    def __init__(self, tokenizer, limit: int = 200_000):
        self.tokenizer, self.limit, self.cache = tokenizer, limit, {}

    def __call__(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for chunk in self.SPLIT.split(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
                if len(cache) < self.limit:
                    cache[chunk] = ids
            out += ids
        return out

    def check(self, seed: int) -> None:
        """Raise unless the cached encoding equals the tokenizer's on a sample of every task."""
        for task in TASKS:
            make, _ = TASKS[task]
            context, query, answers = make(random.Random(f"check/{seed}/{task}"), 60)
            for text in (context, query + answer_text(answers)):
                if self(text) != self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                    raise RuntimeError(f"chunked tokenization differs from the tokenizer's on {task}")


class Sizer:
    """Filler units for a target length, per task: a linear fit of tokens against units."""

    def __init__(self, encode: Encoder, seed: int):
        self.fit, self.least = {}, {}
        for task, (make, _) in TASKS.items():
            context, query, answers = make(random.Random(f"least/{seed}/{task}"), 1)
            self.least[task] = 2 + len(encode(context)) + len(encode(query)) + len(encode(answer_text(answers)))
            sizes = []
            for n in (50, 400):
                context, query, _ = make(random.Random(f"size/{seed}/{task}"), n)
                sizes.append(len(encode(context)) + len(encode(query)))
            slope = (sizes[1] - sizes[0]) / 350
            self.fit[task] = (sizes[0] - 50 * slope, slope)

    def fits(self, task: str, length: int) -> bool:
        """Whether a sample of ``task`` with the least filler and its answer fits in ``length`` tokens."""
        return self.least[task] <= length

    def units(self, task: str, length: int) -> int:
        base, slope = self.fit[task]
        return max(1, int((length - base) / slope))


def _drill_parts(task: str, rng: random.Random, n: int, questions: int):
    """A task context with ``questions`` questions: ``(context, [(query, answers)])``."""
    make, _ = TASKS[task]
    if task == "vt":
        context, asked = T.vt_parts(rng, n, chains=questions)
        return context, [(T.vt_question(value, len(chain)), chain) for value, chain in asked]
    if task == "qa":
        context, facts = T.qa_parts(rng, n)
        picks = rng.sample(facts, min(questions, len(facts)))
        return context, [(T.qa_question(town, thing), [who]) for town, who, thing in picks]
    options = dict(make.options)
    per_question = options.pop("queries", 1)
    context, what, asked = T.niah_parts(rng, n, queries=per_question * questions, **options)
    groups = [asked[i * per_question:(i + 1) * per_question] for i in range(questions)]
    return context, [(T.niah_question([k for k, _ in g], what), [v for _, vals in g for v in vals]) for g in groups]


def make_example(encode: Encoder, sizer: Sizer, rng: random.Random, length: int, tasks: list[str],
                 prose_share: float, drill_share: float, questions: int):
    """``(ids, roles, spans)``: ``roles[i]`` is 1 on answer tokens (the answer text and its eos), 0
    elsewhere; ``spans`` lists ``(start, end, task)`` of each answer (empty for prose)."""
    tokenizer = encode.tokenizer
    roll = rng.random()
    if roll < prose_share:
        ids = [tokenizer.bos_token_id]
        while len(ids) < length:
            ids += encode(" " + prose.paragraph(rng) + "\n")
        ids = ids[:length]
        return ids, [0] * len(ids), []
    task = rng.choice([t for t in tasks if sizer.fits(t, length)] or tasks)  # e.g. no word lists at 256
    drill = roll < prose_share + drill_share and task in DRILLS
    count = rng.randint(2, questions) if drill else 1
    target = length - count * 50
    for _ in range(8):  # the fit is an estimate: shrink the filler, then ask fewer, until every answer fits
        n = sizer.units(task, max(64, target))
        if drill:
            context, asked = _drill_parts(task, rng, n, count)
        else:
            context, query, answers = TASKS[task][0](rng, n)
            asked = [(query, answers)]
        ids = [tokenizer.bos_token_id] + encode(context)
        roles = [0] * len(ids)
        spans = []
        for query, answers in asked:
            if task in UNORDERED:  # scoring ignores order; the target lists them as the context does
                answers = sorted(answers, key=lambda a: context.find(" " + a))
            q = encode(query)
            a = encode(answer_text(answers)) + [tokenizer.eos_token_id]
            begin = len(ids) + len(q)
            ids += q + a
            roles += [0] * len(q) + [1] * len(a)
            spans.append((begin, begin + len(a), task))
        if len(ids) <= length:
            break
        if n > 1:
            target -= int((len(ids) - length) * 1.1) + 8
        elif count > 1:
            count -= 1
        else:
            break  # even the least filler and one question do not fit: the example is cut at length
    return ids[:length], roles[:length], [s for s in spans if s[1] <= length]
