"""The command line and the launchers: ``star-sp generate`` in one process, under torchrun and
under the deepspeed launcher (CPU, gloo), and its errors (exit code 1 on every rank, one clear line).
``test_cli_launchers.py`` covers what a user sees of an error or Ctrl-C under the launchers."""

import json
import os
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


@pytest.mark.slow
@pytest.mark.parametrize("nproc, extra", [(2, ()), (3, ("--anchor-source", "recompute")), (4, ("--attention", "ring"))])
def test_torchrun_matches_one_process(dirs, capsys, nproc, extra):
    expected = _single(dirs, capsys, *extra)
    proc = _launch([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "launch/infer.py",
                    *_args(dirs, *extra)])
    record = _record(proc)
    assert record["tokens"] == expected["tokens"] and record["world_size"] == nproc


@pytest.mark.slow
def test_deepspeed_launcher_matches_one_process(dirs, capsys):
    expected = _single(dirs, capsys)
    proc = _launch([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                    "launch/infer.py", *_args(dirs)])
    assert _record(proc)["tokens"] == expected["tokens"]
    assert "JIT" not in proc.stdout + proc.stderr  # no DeepSpeed extension was built


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
