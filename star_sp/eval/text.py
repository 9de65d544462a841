"""Haystack text that reads like natural English prose, generated (no corpus, no licence question).

A small probabilistic grammar over a few hundred common words builds sentences of varied structure
(statements, clauses joined by conjunctions, dialogue-like lines, short questions) grouped into
paragraphs; no sentence template repeats often enough to be a pattern a model can copy. Deterministic
for a given ``random.Random``.
"""

from __future__ import annotations

import random

NOUNS = ("river city garden window letter teacher village morning market road friend doctor winter farmer "
         "house lamp story mountain harbor train kitchen forest table ship bridge student field night season "
         "painter brother sister neighbor machine library summer evening island valley school office mother "
         "father child book song rain wind stone door coat hill street boat bell clock candle factory church "
         "castle garden wall meadow orchard captain soldier merchant sailor baker widow stranger journey "
         "festival harvest storm shadow silence answer question promise message photograph newspaper").split()
ADJECTIVES = ("old quiet bright small narrow heavy warm cold distant gentle broken green careful tired busy "
              "strange early late simple proud empty crowded golden silver patient sudden famous hidden "
              "ordinary curious honest narrow steep wide soft loud dark clear pale").split()
VERBS_PAST = ("walked carried opened watched remembered painted followed crossed repaired noticed visited "
              "built answered closed wrote carried found lost kept sold bought heard counted cleaned "
              "described explained finished gathered measured ordered planted studied").split()
VERBS_INTRANS = ("waited laughed slept arrived listened returned wandered hesitated smiled paused stayed "
                 "worked sang rested shouted").split()
ADVERBS = ("slowly quietly carefully suddenly finally often rarely again almost nearly gladly soon "
           "yesterday later early").split()
PLACES = ("near the river", "by the old bridge", "in the market", "behind the church", "across the valley",
          "on the narrow road", "at the edge of the forest", "inside the library", "under the bright lamp",
          "along the harbor", "beyond the hills", "in the small kitchen", "outside the factory")
NAMES = ("Anna Marek Lucia Tomas Elena Victor Clara Hugo Ines Pavel Rosa Felix Nora Emil Sofia Oskar "
         "Lena Bruno Ada Jonas").split()
CONNECTORS = ("and", "but", "so", "because", "while", "although", "until", "before", "after")
OPENERS = ("In the end,", "That year,", "For a while,", "Even so,", "At first,", "Later that day,",
           "By then,", "Every spring,", "Of course,", "Without a word,")


def _np(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return rng.choice(NAMES)
    noun = rng.choice(NOUNS)
    if roll < 0.55:
        return f"the {rng.choice(ADJECTIVES)} {noun}"
    if roll < 0.7:
        return f"a {rng.choice(ADJECTIVES)} {noun}"
    return f"the {noun}"


def _clause(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.45:
        core = f"{_np(rng)} {rng.choice(VERBS_PAST)} {_np(rng)}"
    elif roll < 0.7:
        core = f"{_np(rng)} {rng.choice(VERBS_INTRANS)} {rng.choice(PLACES)}"
    elif roll < 0.85:
        core = f"{_np(rng)} {rng.choice(ADVERBS)} {rng.choice(VERBS_PAST)} {_np(rng)} {rng.choice(PLACES)}"
    else:
        core = f"{_np(rng)} was {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}"
    return core


def sentence(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        text = _clause(rng)
    elif roll < 0.8:
        text = f"{_clause(rng)} {rng.choice(CONNECTORS)} {_clause(rng)}"
    elif roll < 0.9:
        text = f"{rng.choice(OPENERS)} {_clause(rng)}"
    else:
        speaker = rng.choice(NAMES)
        return f'"{_clause(rng).capitalize()}," said {speaker}.'
    text = text[0].upper() + text[1:]
    return text + ("?" if roll > 0.97 else ".")


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))


def sentences(rng: random.Random, n: int) -> list[str]:
    """``n`` sentences, with a paragraph break every few sentences (kept as separate list items)."""
    out: list[str] = []
    while len(out) < n:
        para = [sentence(rng) for _ in range(rng.randint(3, 7))]
        para[-1] += "\n"
        out.extend(para)
    return out[:n]
