"""The Megatron-core launcher (``launch/megatron_gpt.py``, ``star_sp.apps.jobs.megatron_gpt``) on CPU.

Bugs these localize: a CP group that is not the Star group or gradients not summed over it (the loss
does not fall, or global and ring, both exact, disagree), the data-parallel or resume bookkeeping off
(a resumed run that is not the uninterrupted one), a checkpoint the generate mode cannot load, W&B
rows missing, a bad flag that hangs or prints a traceback instead of one line on every rank.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install star-sp[megatron])")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# the tiny CPU config (2 layers, hidden 64, the reference tokenizer, samples of 256-384 tokens, CP 2)
TINY = ["--config", "configs/megatron-tiny-cpu.toml", "--lr", "1e-2", "--context-loss-weight", "0.1", "--quiet"]
STEPS = 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchrun(args, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "launch/megatron_gpt.py",
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two processes, one CP group of 2, ``STEPS`` steps under each attention (star logs to W&B, and
    recomputes every layer with its inputs offloaded; global recomputes core attention)."""
    outs = {}
    for attention in ("star", "global", "ring"):
        out = tmp_path_factory.mktemp(attention) / "out"
        extra = {"star": ["--wandb", "megatron-test", "--recompute", "full", "--offload-activations"],
                 "global": ["--recompute", "selective"], "ring": []}[attention]
        result = _torchrun([*TINY, "--attention", attention, "--out", out, "--steps", STEPS, "--save-every", 4, *extra])
        assert result.returncode == 0, result.stderr[-4000:]
        outs[attention] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["star", "global", "ring"])
def test_two_processes_train_and_the_loss_falls(trained, attention):
    rows = _rows(trained[attention])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    assert all(r["context_loss"] is not None and r["grad_norm"] > 0 for r in rows)
    assert (rows[0]["block_size"] is None) == (attention != "star")  # only star reads the sizes
    assert set(os.listdir(trained[attention])) == {"checkpoint-0000004", "checkpoint-0000008", "train_log.jsonl",
                                                   *(["wandb"] if attention == "star" else [])}


@pytest.mark.slow
def test_global_and_ring_are_the_same_exact_attention(trained):
    """Both exact causal attention over the CP group (one block on the last rank; zigzag ring): the same
    losses up to float32 rounding, step after step."""
    for g, r in zip(_rows(trained["global"]), _rows(trained["ring"]), strict=True):
        assert r["loss"] == pytest.approx(g["loss"], rel=1e-3), (g, r)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_rows(trained):
    from test_finetune import _wandb_records

    runs = glob.glob(str(trained["star"] / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    history = {}
    for record in _wandb_records(runs[0]):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    for row in _rows(trained["star"]):
        logged = history[row["step"]]
        for key in ("loss", "answer_loss", "context_loss", "lr", "grad_norm", "block_size", "anchor_size"):
            assert logged[f"train/{key}"] == pytest.approx(row[key]), (row["step"], key)


@pytest.mark.slow
def test_generate_answers_from_the_checkpoint_as_one_process_does(trained, tmp_path, capsys):
    """``--generate`` on 2 processes (global: exact, so a CP group of 2 must write what one process
    writes) prints the greedy answer once."""
    from star_sp.apps.jobs.megatron_gpt import main

    context = tmp_path / "context.txt"
    context.write_text("The special magic number is 7321. " * 12 + "The grass is green. " * 10)
    ask = ["--out", trained["star"], "--generate", "--context-file", context, "--query",
           "What is the special magic number?", "--max-new-tokens", 6, "--attention", "global"]
    result = _torchrun([*TINY, *ask])
    assert result.returncode == 0, result.stderr[-4000:]
    assert main([str(a) for a in [*TINY, *ask, "--context-parallel-size", 1]]) == 0
    alone = capsys.readouterr().out
    assert result.stdout == alone and alone.strip(), (result.stdout, alone)
    star = _torchrun([*TINY, *ask[:-1], "star", "--checkpoint", trained["star"] / "checkpoint-0000004"])
    assert star.returncode == 0 and len(star.stdout.splitlines()) == 1, star.stderr[-4000:]


def test_resume_continues_as_an_uninterrupted_run(tmp_path):
    """One process: stopped after the checkpoint at step 2, rerun: the same weights and log as four
    steps in one go (float32 on CPU in one process is deterministic: equal to the bit)."""
    from star_sp.apps.jobs.megatron_gpt import main

    flags = [*TINY, "--context-parallel-size", 1, "--steps", 4, "--save-every", 2, "--keep-last", 0,
             "--lengths", "200,260"]
    for out in ("whole", "cut"):
        assert main([str(a) for a in [*flags, "--out", tmp_path / out]]) == 0
    cut = tmp_path / "cut"
    shutil.rmtree(cut / "checkpoint-0000004")
    rows = _rows(cut)
    (cut / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert main([str(a) for a in [*flags, "--out", cut]]) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint-0000004" / "model.pt")
    again = torch.load(cut / "checkpoint-0000004" / "model.pt")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole if whole[k] is not None)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_gb")}  # noqa: E731
    assert [drop(r) for r in _rows(cut)] == [drop(r) for r in _rows(tmp_path / "whole")]
    assert main([str(a) for a in [*flags, "--out", cut, "--lr", "2e-2"]]) == 1  # another run's settings


def test_jsonl_data_trains_one_sample_per_step(tmp_path):
    from transformers import AutoTokenizer

    from star_sp import reference_model_path
    from star_sp.apps.jobs.data import JsonlData
    from star_sp.apps.jobs.megatron_gpt import main

    data = tmp_path / "data.jsonl"
    records = [{"context": f"Record {i}: the code is {i * 37}. " * 20, "query": " The code is", "answer": f" {i * 37}."}
               for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert main([str(a) for a in [*TINY, "--context-parallel-size", 1, "--data", data, "--steps", 3, "--out", out,
                                  "--star-block-size", 64, "--star-anchor-size", 16]]) == 0
    source = JsonlData(str(data), AutoTokenizer.from_pretrained(reference_model_path()), [2, 8], [0.25, 1], 0, 1, 1)
    tokens = [source.sample(step, 0, 0).tokens for step in range(3)]
    rows = _rows(out)
    assert [r["tokens"] for r in rows] == [sum(tokens[: i + 1]) for i in range(3)], rows
    assert {(r["block_size"], r["anchor_size"]) for r in rows} == {(64, 16)}


BAD = [  # (flags, words of the one line)
    (["--star-block-size", 0], "--star-block-size must be a positive number of tokens, got 0"),
    (["--star-block-size", 8, "--star-anchor-size", 9], "--star-anchor-size must be between 0 and the block size (8)"),
    (["--context-parallel-size", 2], "--context-parallel-size 2 must divide the number of processes (1)"),
    (["--star-anchor-size", -1], "--star-anchor-size must be an integer >= 0, got -1"),
    (["--generate", "--query", "q"], "generate needs --context-file FILE"),
    (["--context-parallel-size", 1, "--num-query-groups", 3], "must divide hidden_size"),
    (["--recompute", "some"], "recompute must be one of none, full, selective, got 'some'"),
    (["--offload-activations"], "offload_activations offloads what recomputation keeps; set recompute = 'full'"),
    (["--offload-layers", 2], "offload_layers = 2 applies to offload_activations; set offload_activations = true"),
    (["--attention", "ring", "--recompute", "full"], "attention = 'ring' does not recompute"),
]


def test_bad_settings_give_one_line(tmp_path, capsys, monkeypatch):
    from star_sp.apps.jobs.megatron_gpt import main

    for flags, words in BAD:
        assert main([str(a) for a in [*TINY, "--out", tmp_path, *flags]]) == 1, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("star-sp megatron: error: ") and words in err[0], (flags, err)
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--attention", "flash"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "invalid choice: 'flash'" in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group: as rank 0 of two would
    assert main([*TINY, "--lengths", "1,300"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["star-sp megatron: error: a sequence of 1 tokens is shorter than one token per context-parallel "
                   "rank (2); use longer sequences or a smaller --context-parallel-size"], err


@pytest.mark.slow
def test_torchrun_bad_setting_one_line():
    result = _torchrun([*TINY, "--context-parallel-size", 2, "--lengths", "1,300"], timeout=120)
    line = ("star-sp megatron: error: a sequence of 1 tokens is shorter than one token per context-parallel rank (2); "
            "use longer sequences or a smaller --context-parallel-size")
    assert result.returncode == 1
    assert result.stderr.splitlines().count(line) == 1, result.stderr  # torchrun's report quotes it as well
    assert "star_sp/" not in result.stderr and "megatron_gpt.py\", line" not in result.stderr, result.stderr
