"""The documentation runs as written: the README's Python and its example commands give the answers it
states, and every repository path that the README, ``docs/*.md``, ``examples/README.md`` and the help of
``star-sp generate`` / ``star-sp eval`` name exists. Catches examples that use undefined names or a
device the machine lacks, and help or docs that point at files that are gone."""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from star_sp.apps.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
README = os.path.join(ROOT, "README.md")
EXAMPLES_README = os.path.join(ROOT, "examples", "README.md")
ANSWER = "6030798."  # the number hidden in examples/needle-2k.txt


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _blocks(path: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", _read(path), flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The shell commands of a ```bash block, continuation lines joined."""
    return [c for c in re.sub(r"\\\n", " ", block).splitlines() if c.strip()]


# -- (a) the Python blocks ---------------------------------------------------------------------

PYTHON_BLOCKS = [(os.path.relpath(p, ROOT), i, code) for p in (README, EXAMPLES_README)
                 for i, code in enumerate(_blocks(p, "python"))]


def _expected_prints(code: str) -> list[str]:
    """What the block says each ``print(...)`` shows, from the comment after it."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", code, flags=re.M)]


def _check_printed(printed: str, expected: str) -> None:
    about = re.fullmatch(r"about (\S+).*", expected)
    if about:  # "about 1e-06": the same order of magnitude
        value, stated = float(printed), float(about.group(1))
        assert stated / 10 <= value <= stated * 10, (printed, expected)
    else:
        assert printed == expected, (printed, expected)


def test_the_readme_has_python_to_run():
    assert len(PYTHON_BLOCKS) >= 3 and all(_expected_prints(code) for _, _, code in PYTHON_BLOCKS)


@pytest.mark.parametrize("source, index, code", PYTHON_BLOCKS, ids=[f"{s}#{i}" for s, i, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(source, index, code, monkeypatch):
    monkeypatch.chdir(ROOT)  # the blocks read examples/ relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{source} python block {index}", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue().strip().splitlines()
    expected = _expected_prints(code)
    assert len(printed) == len(expected), (printed, expected)
    for got, want in zip(printed, expected):
        _check_printed(got.strip(), want)


def test_expected_output_check_can_fail():
    _check_printed("2e-06", "about 1e-06 in float32")
    for printed, expected in (("3e-04", "about 1e-06"), (" 42.", "6030798."), ("6030798", "6030798.")):
        with pytest.raises(AssertionError):
            _check_printed(printed.strip(), expected)


# -- (b) every repository path named exists ----------------------------------------------------

TOP = ("star_sp", "tests", "tools", "docs", "configs", "launch", "examples", ".ci")
SUBPACKAGES = ("ops", "distributed", "integrations", "eval", "models")  # written relative to star_sp/
PATH = re.compile(r"(?<![\w./-])[A-Za-z0-9_.*-]+(?:/[A-Za-z0-9_.*-]*)+")


def repository_paths(text: str) -> list[str]:
    """Paths in ``text`` that point into the repository: they start with one of its top-level
    folders (or a subpackage of ``star_sp``). User paths (``./my-llama``, ``book.txt``), outputs
    (``runs/...``) and fractions (``1/4``) are not repository paths."""
    found = []
    for match in PATH.finditer(text):
        path = match.group(0).rstrip(".")
        first = path.split("/")[0]
        if first in SUBPACKAGES:
            path = "star_sp/" + path
        elif first not in TOP:
            continue
        if path not in found:
            found.append(path)
    return found


def _missing(paths: list[str]) -> list[str]:
    def exists(p):
        return bool(glob.glob(os.path.join(ROOT, p))) if "*" in p else os.path.exists(os.path.join(ROOT, p))
    return [p for p in paths if not exists(p)]


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command].format_help()


DOCS = [README, EXAMPLES_README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SOURCES = {**{os.path.relpath(p, ROOT): (lambda p=p: _read(p)) for p in DOCS},
           "star-sp generate --help": lambda: _help("generate"), "star-sp eval --help": lambda: _help("eval")}


def test_the_path_finder_finds_paths_and_only_paths():
    text = ("see configs/nope.toml, `star_sp/ops/star.py`, ops/merge.py and configs/*.toml; not ./my-llama, "
            "book.txt, runs/eval, 1/4 or summary.md/json. Also launch/infer.py.")
    assert repository_paths(text) == ["configs/nope.toml", "star_sp/ops/star.py", "star_sp/ops/merge.py",
                                      "configs/*.toml", "launch/infer.py"]
    assert _missing(repository_paths(text)) == ["configs/nope.toml"]
    readme = repository_paths(_read(README))
    for path in ("examples/needle-2k.txt", "launch/infer.py", "docs/design.md", "docs/benchmarks.md",
                 "docs/accuracy.md"):
        assert path in readme


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_path_named_exists(source):
    paths = repository_paths(SOURCES[source]())
    if not source.endswith("--help"):  # a help text may name no path; every page here does
        assert paths, f"{source} names no repository path: the finder is broken"
    assert _missing(paths) == [], f"{source} names paths that do not exist"


def test_no_design_notes_outside_the_repository():
    """The design notes live in docs/design.md; nothing points at a DESIGN.md outside the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = [f for f in tracked if f.endswith((".py", ".md", ".toml", ".sh", "Makefile"))
                 and f != "tests/test_docs.py" and "DESIGN.md" in _read(os.path.join(ROOT, f))]
    assert offenders == []


# -- (c) the README's example commands ---------------------------------------------------------

def _example_commands() -> list[str]:
    return [c for block in _blocks(README, "bash") for c in _commands(block) if "--model reference" in c]


def _run(command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1")
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_states_the_example_and_its_answer():
    commands = _example_commands()
    assert [c.split()[0] for c in commands] == ["star-sp", "torchrun"]
    assert f"print ` {ANSWER}`" in _read(README)
    # examples/README.md shows the same two commands (comments aside)
    shown = [c for block in _blocks(EXAMPLES_README, "bash") for c in _commands(block) if "--model reference" in c]
    assert [shlex.split(c, comments=True) for c in shown] == [shlex.split(c, comments=True) for c in commands]


@pytest.mark.slow
def test_readme_example_command_answers():
    """The one-process command as written. Its torchrun twin runs, as written, in
    ``test_launch.py::test_infer_under_the_launchers_matches_one_process`` (with the other launchers)."""
    command = next(c for c in _example_commands() if c.split()[0] == "star-sp")
    proc = _run(command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ANSWER, (proc.stdout, proc.stderr[-3000:])


@pytest.mark.slow
def test_layer_across_hosts_example_matches_the_oracle():
    command = next(c for block in _blocks(EXAMPLES_README, "bash") for c in _commands(block)
                   if "layer_across_hosts.py" in c)
    proc = _run(command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d+): context tokens", proc.stdout)) == ["0", "1"], proc.stdout
