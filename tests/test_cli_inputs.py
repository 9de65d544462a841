"""``star-sp generate`` on inputs a new user gives it: empty contexts, missing or incomplete model
directories, token ids outside the vocabulary, one new token (no decode speed to report), ``--quiet``.
Each is refused with one line naming the problem and the fix (exit code 1), or runs with no NaN shown.
"""

import json
import math
import os

import pytest
import transformers

from star_sp.apps.cli import main
from star_sp.testing import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT = "the secret key of the city is 4 2 7 . the river was long and the people had water ."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-inputs")
    save(base / "tiny", "llama", seed=3)
    save(base / "no-weights", "llama", seed=3)
    os.remove(base / "no-weights" / "model.safetensors")
    save(base / "no-config", "llama", seed=3)
    os.remove(base / "no-config" / "config.json")
    (base / "context.txt").write_text(CONTEXT)
    (base / "empty.txt").write_text("")
    (base / "blank.txt").write_text(" \n\t\n")
    (base / "ids.txt").write_text("5 6 7 99999 8")
    return base


def _run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, argv, *words):
    """Exit code 1 and exactly one line on stderr that holds every one of ``words``."""
    code, out, err = _run(capsys, *argv)
    assert code == 1 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("star-sp: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "nan" not in err.lower()
    return lines[0]


@pytest.mark.parametrize("name", ["empty.txt", "blank.txt"])
def test_an_empty_context_file_is_refused(dirs, capsys, name):
    # The reference model's tokenizer adds BOS: an empty file gave one token, exit 0 and NaN stats.
    _refused(capsys, ["--model", "reference", "--context-file", str(dirs / name), "--query", "what is it?",
                      "--max-new-tokens", "2", "--json"],
             "the context is empty", f"--context-file {dirs / name}", "holds no text")


def test_an_empty_context_ids_file_is_refused(dirs, capsys):
    _refused(capsys, ["--model", str(dirs / "tiny"), "--context-ids", str(dirs / "empty.txt"), "--query-ids", "5"],
             "the context is empty", "holds no token ids")


def test_an_empty_query_is_refused(dirs, capsys):
    _refused(capsys, ["--model", "reference", "--context-file", str(dirs / "context.txt"), "--query", ""],
             "the query is empty", "--query")


def test_one_new_token_reports_no_nan(dirs, capsys):
    """One new token has no decode speed: JSON says null (never NaN), the text line says n/a."""
    argv = ["--model", str(dirs / "tiny"), "--context-file", str(dirs / "context.txt"), "--query", "what is it ?",
            "--max-new-tokens", "1", "--dtype", "float64", "--block-size", "9", "--anchor-size", "4"]
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0

    def no_constant(name):
        raise AssertionError(f"the JSON record holds {name}")

    record = json.loads(out.strip().splitlines()[-1], parse_constant=no_constant)
    assert record["new_tokens"] == 1 and record["decode_tokens_per_s"] is None
    assert all(not isinstance(v, float) or math.isfinite(v) for v in record.values())
    code, out, err = _run(capsys, *argv, "--quiet")
    stats = [line for line in err.splitlines() if line.startswith("[star-sp]")]
    assert code == 0 and len(stats) == 1 and "nan" not in stats[0].lower()
    assert "decode speed n/a (1 new token(s))" in stats[0]


@pytest.mark.parametrize("model, random_weights, words", [
    ("does-not-exist", False, ["model directory does-not-exist does not exist", "'reference'"]),
    ("./nested/does-not-exist", True, ["model directory ./nested/does-not-exist does not exist"]),
    ("no-config", False, ["has no config.json"]),
    ("no-weights", False, ["has no weights", "--random-weights"]),
    ("context.txt", False, ["is a file, not a directory"]),
])
def test_a_missing_or_incomplete_model_directory_is_named(dirs, capsys, monkeypatch, model, random_weights, words):
    monkeypatch.chdir(dirs)  # relative names are looked up here
    argv = ["--model", model, "--random-context", "8", "--random-query", "2", "--max-new-tokens", "1"]
    line = _refused(capsys, argv + (["--random-weights"] if random_weights else []), *words)
    assert "Repo id" not in line and "huggingface" not in line.lower()


def test_random_weights_need_only_the_config(dirs, capsys):
    code, out, err = _run(capsys, "--model", str(dirs / "no-weights"), "--random-weights", "--random-context", "8",
                          "--random-query", "2", "--max-new-tokens", "2", "--json")
    assert code == 0 and len(json.loads(out)["tokens"]) == 2, err


@pytest.mark.parametrize("flag, value, source", [
    ("--query-ids", "5 {bad} 6", "--query-ids"),
    ("--context-ids", "FILE", "--context-ids file"),
])
@pytest.mark.parametrize("bad", [99999, -1])
def test_token_ids_outside_the_vocabulary_are_named(dirs, capsys, flag, value, source, bad):
    vocab = transformers.AutoConfig.from_pretrained(dirs / "tiny").vocab_size
    ids_file = dirs / f"ids{bad}.txt"
    ids_file.write_text(f"5 6 {bad} 8")
    other = ["--context-ids", str(dirs / "ids.txt").replace("ids.txt", "ok.txt")] if flag == "--query-ids" else \
        ["--query-ids", "5 6"]
    (dirs / "ok.txt").write_text("5 6 7 8 9")
    argv = ["--model", str(dirs / "tiny"), flag, str(ids_file) if value == "FILE" else value.format(bad=bad), *other]
    _refused(capsys, argv, source, f"token id {bad}", f"vocabulary of {vocab} ids", f"0 to {vocab - 1}")


def test_quiet_silences_the_weights_loading_bar(dirs, capfd):
    from transformers.utils import logging as hf_logging

    argv = ["generate", "--model", str(dirs / "tiny"), "--context-file", str(dirs / "context.txt"), "--query",
            "what is it ?", "--max-new-tokens", "2", "--block-size", "9"]
    assert main(argv) == 0
    assert "Loading weights" in capfd.readouterr().err  # the bar exists, so its absence below means something
    assert main([*argv, "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "] layer 1/" not in err  # no bar for loading or prefill
    assert hf_logging.is_progress_bar_enabled()  # restored for whoever runs next in this process


def test_a_query_file_reads_as_the_query_text(dirs, capsys):
    """--query-file FILE asks what --query "$(cat FILE)" asks: the file's final newline is dropped (the
    reference model's byte-level tokenizer would read it as a token before the answer)."""
    (dirs / "query.txt").write_text("What is the secret key of the city? The secret key of the city is\n")
    common = ["--model", "reference", "--context-file", str(dirs / "context.txt"), "--max-new-tokens", "3", "--json"]
    code, by_file, err = _run(capsys, *common, "--query-file", str(dirs / "query.txt"))
    assert code == 0, err
    code, by_text, err = _run(capsys, *common, "--query", (dirs / "query.txt").read_text().rstrip("\n"))
    assert code == 0, err
    assert json.loads(by_file)["tokens"] == json.loads(by_text)["tokens"]
    assert json.loads(by_file)["context_tokens"] == json.loads(by_text)["context_tokens"]


def test_several_questions_of_one_context_give_each_its_own_answer(dirs, capsys):
    """--query given several times (or --questions-file): one context, the questions decoded together,
    each answer what the question gets alone."""
    questions = ["What is the secret key of the city? The secret key of the city is", "Was the river long?"]
    (dirs / "questions.txt").write_text(questions[0] + "\n\n" + questions[1] + "\n")
    common = ["--model", "reference", "--context-file", str(dirs / "context.txt"), "--max-new-tokens", "4", "--json"]
    alone = []
    for q in questions:
        code, out, err = _run(capsys, *common, "--query", q)
        assert code == 0, err
        alone.append(json.loads(out)["tokens"])
    for source in (["--query", questions[0], "--query", questions[1]], ["--questions-file", str(dirs / "questions.txt")]):
        code, out, err = _run(capsys, *common, *source)
        assert code == 0, err
        assert [a["tokens"] for a in json.loads(out)["answers"]] == alone
    code, out, err = _run(capsys, *common[:-1], "--query", questions[0], "--query", questions[1])
    assert code == 0 and out.startswith("[1] ") and "\n[2] " in out, out
    (dirs / "one-question.txt").write_text(questions[1] + "\n")  # a file of one question still answers as a list
    code, out, err = _run(capsys, *common, "--questions-file", str(dirs / "one-question.txt"))
    assert code == 0 and [a["tokens"] for a in json.loads(out)["answers"]] == alone[1:], (out, err)
    (dirs / "no-questions.txt").write_text("\n \n")
    _refused(capsys, [*common, "--questions-file", str(dirs / "no-questions.txt")], "holds no questions")
    _refused(capsys, [*common, "--query", "a?", "--query", "b?", "--query-ids", "5 6"],
             "--query given more than once or from --questions-file alone")
