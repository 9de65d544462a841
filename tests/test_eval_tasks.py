"""Task generators (deterministic, on length, answerable) and RULER scoring."""

import pytest

from star_sp import StarInputError
from star_sp.eval import FAMILIES, TASKS, generate, resolve_tasks, score, score_all, score_part
from star_sp.testing import tiny_tokenizer

TOK = tiny_tokenizer()


def count(text: str) -> int:
    return len(TOK(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [300, 1500, 4000])
def test_samples_are_deterministic_on_length_and_answerable(task, length):
    a = generate(task, length, 3, count, seed=7)
    assert a == generate(task, length, 3, count, seed=7)
    assert a != generate(task, length, 4, count, seed=7)
    total = count(a.context) + count(a.query)
    slack = 8 if task not in ("cwe", "fwe") else max(8, length // 100)  # word lists grow by whole entries
    assert length - slack <= total <= length, total
    assert a.answers and all(ans for ans in a.answers)
    if task.startswith("niah") or task in ("vt", "qa"):
        assert all(ans in a.context for ans in a.answers)
        assert all(ans not in a.query for ans in a.answers if task != "vt")
    if task == "cwe":
        words = [w for w in a.context.split() if not w[0].isdigit()]
        least_common = min(words.count(w) for w in a.answers)
        assert all(words.count(w) < least_common for w in set(words) - set(a.answers) if w.isalpha() and w.islower())


def test_prose_haystack_is_varied():
    sample = generate("niah_single_2", 4000, 0, count)
    sentences = [s.strip() for s in sample.context.replace("\n", " ").split(".") if s.strip()]
    assert len(set(sentences)) > 0.9 * len(sentences)


def test_resolve_tasks_and_errors():
    assert resolve_tasks(["niah_single"]) == FAMILIES["niah_single"]
    assert resolve_tasks(["vt", "vt", "qa"]) == ["vt", "qa"]
    assert resolve_tasks(["all"]) == list(TASKS)
    with pytest.raises(StarInputError, match="unknown task 'needle'"):
        resolve_tasks(["needle"])
    with pytest.raises(StarInputError, match="at least 64 tokens"):
        generate("vt", 10, 0, count)


@pytest.mark.parametrize("pred, answers, all_, part", [
    ("The number is 1234567.", ["1234567"], 100, 100),
    ("numbers: 111 and 222", ["111", "222", "333", "444"], 50, 100),
    ("nothing here", ["5"], 0, 0),
    ("ANNA built it", ["Anna"], 100, 100),
])
def test_scoring(pred, answers, all_, part):
    assert score_all(pred, answers) == all_ and score_part(pred, answers) == part
    assert score(pred, answers, "all") == all_
    with pytest.raises(ValueError):
        score(pred, answers, "exact")
