"""RULER-style synthetic tasks (Hsieh et al., 2024), generated from a seed at a length in tokens.

Every sample is split the way Star Attention needs it: ``context`` is everything up to the question,
``query`` is the question plus the answer prefix. Families (13 tasks):

- ``niah_single_{1,2,3}``: one needle; haystack noise / prose / prose; value number / number / UUID.
- ``niah_multikey_{1,2,3}``: one needle among distractor needles with other keys; haystack prose /
  needles only (word keys) / needles only (UUID keys and values).
- ``niah_multivalue``: four values for one key, all asked for.
- ``niah_multiquery``: four keys asked for at once.
- ``vt``: variable tracking through chains of assignments; name every variable holding a value.
- ``cwe`` / ``fwe``: common-words and frequent-words extraction from long word lists.
- ``qa``: question answering over many short documents of generated facts.

Lengths are met with the caller's tokenizer by searching the amount of filler (within a few tokens
of the target, counting context and query). Scoring (``scoring.py``) follows RULER: ``all`` (share of
the answers found) or ``part`` (any answer found), 0-100.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..errors import StarInputError
from . import text

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    index: int
    context: str
    query: str
    answers: tuple[str, ...]
    metric: str  # "all" or "part"

    def to_dict(self) -> dict:
        return asdict(self)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(text.ADJECTIVES)}-{rng.choice(text.NOUNS)}-{rng.choice(text.NOUNS)}"


def _pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word: 20 * 5 choices per syllable."""
    return "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(syllables))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng, make, n, avoid=()):
    out: dict[str, None] = {}
    avoid = set(avoid)
    for _ in range(50 * n + 100):
        if len(out) == n:
            return list(out)
        x = make(rng)
        if x not in avoid:
            out[x] = None
    raise StarInputError(f"could not draw {n} distinct items: the length asks for more than this task can make")


def _insert(filler: list[str], items: list[str], rng: random.Random) -> list[str]:
    """Put ``items`` at random depths between filler sentences, keeping their order."""
    slots = sorted(rng.randint(0, len(filler)) for _ in items)
    out, prev = [], 0
    for slot, item in zip(slots, items):
        out += filler[prev:slot] + [item]
        prev = slot
    return out + filler[prev:]


def _join(parts: list[str]) -> str:
    return " ".join(parts).replace("\n ", "\n")


def _haystack(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "noise":
        return [NOISE[i % len(NOISE)] for i in range(n)]
    return text.sentences(rng, n)


NUMBER_INTRO = ("Some special magic {what} are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the {what} afterwards.\n")


def _needle(key: str, value: str, what: str) -> str:
    return f"One of the special magic {what} for {key} is: {value}."


def _question(keys: list[str], what: str) -> str:
    if len(keys) == 1:
        return (f"What is the special magic {what[:-1]} for {keys[0]} mentioned in the provided text? "
                f"The special magic {what[:-1]} for {keys[0]} mentioned in the provided text is")
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return (f"What are all the special magic {what} for {listed} mentioned in the provided text? "
            f"The special magic {what} for {listed} mentioned in the provided text are")


def niah_parts(rng: random.Random, n: int, haystack: str, value_kind: str, *, distractors: int = 0,
               values: int = 1, queries: int = 1, key_kind: str = "word"):
    """A needle-in-a-haystack context with ``queries`` asked keys: ``(context, what, [(key, values)])``.
    The building block of the ``niah_*`` tasks (and of the reference model's training drills)."""
    make_key = _uuid if key_kind == "uuid" else _key
    make_value = _uuid if value_kind == "uuid" else _number
    what = "uuids" if value_kind == "uuid" else "numbers"
    keys = _distinct(rng, make_key, queries + distractors)
    asked, needles = [], []
    for key in keys[:queries]:
        vals = _distinct(rng, make_value, values)
        asked.append((key, vals))
        needles += [_needle(key, v, what) for v in vals]
    needles += [_needle(k, make_value(rng), what) for k in keys[queries:]]
    rng.shuffle(needles)
    if haystack == "needles":  # the haystack itself is made of needles for other keys
        others = _distinct(rng, make_key, n, avoid=keys)
        filler = [_needle(k, make_value(rng), what) for k in others]
    else:
        filler = _haystack(haystack, rng, n)
    context = NUMBER_INTRO.format(what=what) + _join(_insert(filler, needles, rng)) + "\n"
    return context, what, asked


def niah_question(keys: list[str], what: str) -> str:
    return _question(keys, what)


def _niah(haystack: str, value_kind: str, **options):
    def make(rng: random.Random, n: int):
        context, what, asked = niah_parts(rng, n, haystack, value_kind, **options)
        return context, _question([k for k, _ in asked], what), [v for _, vals in asked for v in vals]
    make.options = dict(haystack=haystack, value_kind=value_kind, **options)
    return make


def vt_parts(rng: random.Random, n: int, chains: int = 1, hops: int = 4):
    """Variable-tracking context with ``chains`` chains of ``hops`` assignments: ``(context, [(value, names)])``."""
    names = _distinct(rng, lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), chains * (hops + 1))
    pending, asked = [], []
    for c in range(chains):
        value = str(rng.randint(10000, 99999))
        chain = names[c * (hops + 1): (c + 1) * (hops + 1)]
        pending.append([f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, hops + 1)])
        asked.append((value, chain))
    lines = []  # the chains interleaved at random, each in its own order
    while pending:
        chain_lines = pending[rng.randrange(len(pending))] if len(pending) > 1 else pending[0]
        lines.append(chain_lines.pop(0))
        pending = [p for p in pending if p]
    body = _join(_insert(_haystack("noise", rng, n), lines, rng))
    context = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" + body + "\n"
    return context, asked


def vt_question(value: str, count: int) -> str:
    return (f"Question: Find all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain(s) of variable assignment in the text above, {count} variables are "
            f"assigned the value {value}, they are:")


def _vt(rng: random.Random, n: int):
    context, [(value, chain)] = vt_parts(rng, n)
    return context, vt_question(value, len(chain)), chain


def _cwe(rng: random.Random, n: int):
    """``n`` list entries: 10 common words repeated often, the rest rare words twice each."""
    repeat = max(4, n // 40)
    rare_count = max(1, (n - 10 * repeat) // 2)
    vocab = _distinct(rng, lambda r: _pseudo_word(r, r.randint(2, 3)), 10 + rare_count)
    common, rare = vocab[:10], vocab[10:]
    words = [w for w in common for _ in range(repeat)] + [w for w in rare for _ in range(2)]
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    context = "Below is a numbered list of words. In these words, some appear more often than others.\n" + listing + "\n"
    query = ("Question: What are the 10 most common words in the above list? Answer: The top 10 words "
             "appearing most often in the list are:")
    return context, query, common


def _fwe(rng: random.Random, n: int):
    coded = _distinct(rng, _pseudo_word, max(20, n // 4))
    weights = [1.0 / (i + 1) ** 1.5 for i in range(len(coded))]
    words = rng.choices(coded, weights=weights, k=max(30, n))
    counts = {w: 0 for w in coded}
    for w in words:
        counts[w] += 1
    top = sorted(coded, key=lambda w: -counts[w])[:3]
    context = ("Read the following coded text and track the frequency of each coded word. Find the three most "
               "frequently appeared coded words.\n" + " ".join(words) + "\n")
    query = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
             "frequently appeared words in the above coded text? Answer: According to the coded text above, "
             "the three most frequently appeared words are:")
    return context, query, top


def qa_parts(rng: random.Random, n: int):
    """Documents of generated facts: ``(context, [(town, builder, thing)])``, one fact per document.
    Each builder has a made-up name of its own, used nowhere else, so that, as in RULER's QA, the
    answer is found in the gold document alone (not guessed from names the prose repeats)."""
    count = max(2, n // 5 + 1)
    towns = _distinct(rng, lambda r: _pseudo_word(r, 2).capitalize() + r.choice(("ville", "burg", "ford", "port")),
                      count)
    builders = _distinct(rng, lambda r: _pseudo_word(r, r.randint(2, 3)).capitalize(), count,
                         avoid={t[:-4] if t.endswith(("burg", "ford", "port")) else t[:-5] for t in towns})
    facts = [(t, who, rng.choice(("bridge", "library", "harbor", "school", "market", "church")))
             for t, who in zip(towns, builders)]
    docs = [f"Document {i + 1}: {text.paragraph(rng)} The {thing} of {town} was built by {who}. {text.sentence(rng)}"
            for i, (town, who, thing) in enumerate(facts)]
    return "Answer the question based on the given documents.\n\n" + "\n".join(docs) + "\n", facts


def qa_question(town: str, thing: str) -> str:
    return f"Question: Who built the {thing} of {town}? Answer: The {thing} of {town} was built by"


def _qa(rng: random.Random, n: int):
    context, facts = qa_parts(rng, n)
    town, who, thing = facts[rng.randrange(len(facts))]
    return context, qa_question(town, thing), [who]


TASKS: dict[str, tuple[Callable, str]] = {
    "niah_single_1": (_niah("noise", "number"), "all"),
    "niah_single_2": (_niah("prose", "number"), "all"),
    "niah_single_3": (_niah("prose", "uuid"), "all"),
    "niah_multikey_1": (_niah("prose", "number", distractors=3), "all"),
    "niah_multikey_2": (_niah("needles", "number"), "all"),
    "niah_multikey_3": (_niah("needles", "uuid", key_kind="uuid"), "all"),
    "niah_multivalue": (_niah("prose", "number", values=4), "all"),
    "niah_multiquery": (_niah("prose", "number", queries=4), "all"),
    "vt": (_vt, "all"),
    "cwe": (_cwe, "all"),
    "fwe": (_fwe, "all"),
    "qa": (_qa, "part"),
}
WORD_LIST_TASKS = ("cwe", "fwe")
FAMILIES = {"niah_single": [t for t in TASKS if t.startswith("niah_single")],
            "niah_multikey": [t for t in TASKS if t.startswith("niah_multikey")],
            "niah_multivalue": ["niah_multivalue"], "niah_multiquery": ["niah_multiquery"],
            "vt": ["vt"], "cwe": ["cwe"], "fwe": ["fwe"], "qa": ["qa"]}


def resolve_tasks(names: list[str]) -> list[str]:
    """Task names from task or family names (``all`` for every task); unknown names raise."""
    out: list[str] = []
    for name in names:
        if name == "all":
            found = list(TASKS)
        elif name in TASKS:
            found = [name]
        elif name in FAMILIES:
            found = FAMILIES[name]
        else:
            raise StarInputError(f"unknown task {name!r}; choose from {sorted(TASKS)}, the families "
                                 f"{sorted(FAMILIES)}, or 'all'")
        out += [t for t in found if t not in out]
    return out


def generate(task: str, length: int, index: int, count_tokens: Callable[[str], int], seed: int = 0) -> Sample:
    """Sample ``index`` of ``task`` with about ``length`` tokens (context plus query).

    ``count_tokens(text)`` counts tokens with the model's tokenizer. The filler amount is searched so
    that the sample is as long as possible without exceeding ``length``.
    """
    if task not in TASKS:
        resolve_tasks([task])
    make, metric = TASKS[task]
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise StarInputError(f"length must be an integer of at least 64 tokens, got {length!r}")

    def build(n: int):
        rng = random.Random(f"{seed}/{task}/{length}/{index}")
        return make(rng, n)

    def size(n: int) -> int:
        context, query, _ = build(n)
        return count_tokens(context) + count_tokens(query)

    lo, hi = 1, 2
    while size(hi) <= length:
        lo, hi = hi, hi * 2
        if hi > 10_000_000:
            break
    if size(lo) > length:
        raise StarInputError(f"{task} needs more than {length} tokens even with the least filler; use a longer length")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= length else (lo, mid)
    context, query, answers = build(lo)
    if task not in WORD_LIST_TASKS:  # close the last gap with the words of one more stretch of haystack
        rng = random.Random(f"{seed}/{task}/{length}/{index}/pad")
        kind = "noise" if task in ("niah_single_1", "vt") else "prose"
        words = " ".join(_haystack(kind, rng, 64)).split()
        budget = length - count_tokens(query)
        body = context.rstrip("\n")
        fits = lambda m: count_tokens(body + " " + " ".join(words[:m]) + "\n") <= budget  # noqa: E731
        lo_w, hi_w = 0, len(words)
        while hi_w - lo_w > 1:
            mid = (lo_w + hi_w) // 2
            lo_w, hi_w = (mid, hi_w) if fits(mid) else (lo_w, mid)
        if lo_w and fits(lo_w):
            context = body + " " + " ".join(words[:lo_w]) + "\n"
    return Sample(task, length, index, context, query, tuple(answers), metric)
