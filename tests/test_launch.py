"""The command line and the launchers: ``star-sp generate`` in one process, under torchrun and
under the deepspeed launcher (CPU, gloo; one test, the documented torchrun commands included), and its
errors (exit code 1 on every rank, one clear line). ``test_cli_launchers.py`` covers what a user sees of
an error or Ctrl-C under the launchers."""

import json
import os
import shlex
import subprocess
import sys

import pytest

import workers
from cluster import free_port
from star_sp.apps.cli import main
from star_sp.testing import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CONTEXT = ("the secret key of the city is 4 2 7 . the river was long and the people had water . "
           "then she made a little way over the water , and they could see the city from there .")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    save(base / "tiny", "llama", seed=3)
    save(base / "no-tokenizer", "llama", seed=3, tokenizer=False)
    save(base / "sliding", "mistral", sliding_window=8)
    (base / "context.txt").write_text(CONTEXT)
    return base


def _args(dirs, *extra, model="tiny"):
    return ["--model", str(dirs / model), "--context-file", str(dirs / "context.txt"), "--query",
            "what is the secret key ?", "--block-size", "9", "--anchor-size", "4", "--max-new-tokens", "6",
            "--dtype", "float64", "--json", *extra]


def _single(dirs, capsys, *extra):
    assert main(["generate", *_args(dirs, *extra)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _launch(cmd, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _record(proc):
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout + proc.stderr[-3000:]  # rank 0 alone prints
    return json.loads(lines[0])


def test_generate_one_process(dirs, capsys):
    """The command's tokens are the float64 oracle's greedy tokens for the same ids (the context with the
    tokenizer's special tokens, the query without) under the same block and anchor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_oracle import oracle_greedy, reference_model

    star = _single(dirs, capsys)
    tok = AutoTokenizer.from_pretrained(dirs / "tiny")
    ctx = torch.tensor([tok(CONTEXT)["input_ids"]])
    query = torch.tensor([tok("what is the secret key ?", add_special_tokens=False)["input_ids"]])
    model = reference_model(AutoModelForCausalLM.from_pretrained(dirs / "tiny"))
    assert star["tokens"] == oracle_greedy(model, ctx, query, 9, 4, 6)[0].tolist()
    assert star["world_size"] == 1 and star["context_tokens"] == ctx.shape[1]
    glob = _single(dirs, capsys, "--attention", "global")
    assert glob["attention"] == "global" and len(glob["tokens"]) == 6


def _doc_torchrun(doc: str, capsys) -> tuple[str, str]:
    """The torchrun command that ``doc`` shows ("readme": the README's, "help": ``star-sp generate --help``'s)
    and its one-process twin, as written."""
    if doc == "readme":
        from test_docs import _example_commands

        commands = _example_commands()
    else:
        from test_cli_help import _commands, _help

        commands = _commands(_help("generate", capsys))
    (torchrun,) = [c for c in commands if c.startswith("torchrun ") and " launch/infer.py " in c]
    (single,) = [c for c in commands if c.startswith("star-sp generate ") and "--model reference" in c]
    return torchrun, single


def _flags(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    return words[words.index("launch/infer.py") + 1:] if "launch/infer.py" in words else words[2:]


LAUNCHES = [  # (id, launcher, processes, extra flags); "readme" and "help": the documented command as written
    ("torchrun-2-readme", "readme", 2, ()),
    ("torchrun-2-help", "help", 2, ()),
    ("torchrun-4-ring", "torchrun", 4, ("--attention", "ring")),
    ("deepspeed-3-recompute", "deepspeed", 3, ("--anchor-source", "recompute")),
]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, nproc, extra", [case[1:] for case in LAUNCHES], ids=[case[0] for case in LAUNCHES])
def test_infer_under_the_launchers_matches_one_process(dirs, capsys, tmp_path, launcher, nproc, extra):
    """``launch/infer.py`` (the ``star-sp generate`` flow) under torchrun at 2 and 4 processes and under
    the deepspeed launcher at 3, with Star's anchor broadcast and recomputed and ring attention: rank 0
    alone prints, and the tokens are one process's.

    At 2 processes it runs the torchrun commands the README and ``star-sp generate --help`` show, as
    written (the shipped reference model over examples/needle-2k.txt): each is its one-process twin's
    flags behind the launcher, and prints the needle (the README's: exactly ``test_docs.ANSWER``, what
    its one-process command prints in ``test_docs.py``; the help's: the number the context hides, as
    its one-process command does in ``test_cli_help.py``). At 3 and 4 processes the tiny float64 model
    gives exactly one process's greedy tokens; the deepspeed launcher builds no DeepSpeed extension."""
    if launcher in ("readme", "help"):
        _run_documented(launcher, nproc, capsys, tmp_path)
        return
    expected = _single(dirs, capsys, *extra)
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port())]
    proc = _launch([*cmd, "launch/infer.py", *_args(dirs, *extra)])
    record = _record(proc)
    assert record["tokens"] == expected["tokens"] and record["world_size"] == nproc
    if launcher == "deepspeed":
        assert "JIT" not in proc.stdout + proc.stderr  # no DeepSpeed extension was built


def _run_documented(doc: str, nproc: int, capsys, tmp_path) -> None:
    from test_cli_help import _needle_answer
    from test_docs import ANSWER, _run

    command, single = _doc_torchrun(doc, capsys)
    assert command.startswith(f"torchrun --standalone --nproc_per_node {nproc} launch/infer.py ")
    assert _flags(command) == _flags(single), (command, single)  # the same request, launched
    if doc == "readme":  # as test_docs runs its commands: bash (the query is read by $(cat ...)), from the root
        proc = _run(command)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == ANSWER, (proc.stdout, proc.stderr[-3000:])
        return
    # as test_cli_help runs its commands: from a scratch folder that links examples/, configs/ and launch/
    for name in ("examples", "configs", "launch"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, command + "\n" + proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[0].split()[0] == _needle_answer(), proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    (dict(model="sliding"), "sliding-window attention"),
    (dict(model="no-tokenizer"), "has no tokenizer"),
    (dict(extra=("--query", "")), "the query is empty"),
    (dict(extra=("--block-size", "0")), "block_size must be a positive integer"),
    (dict(extra=("--block-size", "5", "--anchor-size", "6")), "must not exceed block_size"),
    (dict(model="missing"), "does not exist"),
])
def test_cli_errors_on_every_rank(dirs, cluster, case, words):
    """Every rank exits 1; the error is the same everywhere, so rank 0 alone prints it."""
    argv = _args(dirs, *case.get("extra", ()), model=case.get("model", "tiny"))
    results = cluster(2).run(workers.cli, "generate", argv)
    assert [code for code, _, _ in results] == [1, 1], results
    assert results[0][2].startswith("star-sp: error: ") and words in results[0][2], results
    assert len(results[0][2].strip().splitlines()) == 1 and results[1][2] == "", results
