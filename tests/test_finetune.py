"""The fine-tuning job (``launch/finetune.py``, ``star_sp.apps.jobs.finetune``) on the tiny model, on CPU.

Bugs these localize: DeepSpeed's averaging over every rank not undone for the sequence-parallel sum
(gradients off by ``sp_size``), the data-parallel mean or the accumulation mean missing or doubled,
ZeRO-2's gradient buckets filled in a different order on different ranks (wrong sums), the SP ranks of
a group drawing different samples or sizes, a resumed run that does not continue the uninterrupted
one (optimizer state, schedule, data position), a checkpoint ``star-sp generate`` cannot load, W&B
keys missing, a bad setting that hangs or prints a traceback instead of one line on every rank.

Run as a script (``python tests/test_finetune.py --grads-out FILE [finetune flags]``, under a
launcher) it is the job with a hook that saves the first step's full gradients, for the tests.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _worker(argv: list[str]) -> int:
    """The job under a launcher, saving step 0's gradients (rank 0) to ``--grads-out``."""
    from star_sp.apps.jobs.finetune import main

    argv = [a for a in argv if not a.startswith("--local_rank")]
    out = argv[argv.index("--grads-out") + 1]
    del argv[argv.index("--grads-out"): argv.index("--grads-out") + 2]

    def inspect(step, grads):
        if step == 0 and int(os.environ.get("RANK", "0")) == 0:
            torch.save(grads, out)

    return main(argv, inspect=inspect)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


import pytest  # noqa: E402

from model_oracle import oracle_train  # noqa: E402
from star_sp import StarConfig  # noqa: E402
from star_sp.testing import exact_norms  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
TASKS = "niah_single_1,vt"
# the tiny model's word-level tokenizer: 60-160 tokens per sample, 2-4 blocks, any anchor
DATA = ["--tasks", TASKS, "--lengths", "100,160", "--blocks", "2,4", "--anchor-fraction", "0,1", "--seed", "3"]
COMMON = [*DATA, "--device", "cpu", "--dtype", "float32", "--lr", "1e-2", "--context-loss-weight", "0.5",
          "--log-every", "1", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this process: the tiny model's many small matmuls run ten times slower on
    two threads of a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from star_sp.testing import save

    return save(tmp_path_factory.mktemp("tiny") / "model")


def _env() -> dict:
    # one thread per process: two gloo processes on two cores with two threads each run 30x slower
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
                TOKENIZERS_PARALLELISM="false")


def _deepspeed() -> list[str]:
    """The launcher on a free port (its default, 29500, may be another job's)."""
    from cluster import free_port

    return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def _launch(launcher: list[str], args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows(out: str) -> dict[int, dict]:
    rows = {}
    with open(os.path.join(out, "train_log.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def _samples(tiny_dir, step: int, accumulation: int, dp_ranks, blocks=(2, 4)):
    from transformers import AutoTokenizer

    from star_sp.apps.jobs.data import TaskData

    data = TaskData(AutoTokenizer.from_pretrained(tiny_dir), TASKS.split(","), [100, 160], list(blocks), [0, 1], 3)
    return [data.sample(step, m, d) for d in dp_ranks for m in range(accumulation)]


def _reference_gradients(tiny_dir, samples, weight: float):
    """The mean over ``samples`` of (a) the float64 oracle's gradients (the plain model under the dense
    ``M_star`` mask, exact RMSNorm) and (b) ``star_train_loss``'s in float32 in one process."""
    from transformers import AutoModelForCausalLM

    from star_sp.training import star_train_loss

    oracle, plain = {}, {}
    model32 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model64 = exact_norms(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64))
    for s in samples:
        _, grads = oracle_train(model64, s.context_ids, s.target_ids, s.labels, s.block_size, s.anchor_size, weight)
        for name, g in grads.items():
            oracle[name] = oracle.get(name, 0) + g / len(samples)
        cfg = StarConfig(block_size=s.block_size, anchor_size=s.anchor_size)
        loss = star_train_loss(model32, s.context_ids, s.target_ids, s.labels, cfg, context_loss_weight=weight)
        (loss / len(samples)).backward()
    plain = {n: p.grad.double() for n, p in model32.named_parameters()}
    return oracle, plain


def _assert_gradients(got: dict, oracle: dict, plain: dict, ranks: int) -> None:
    """Each parameter's gradient from the job within the bound that a plain float32 implementation
    sets, as flash-attn bounds its kernels: twice the error of ``star_train_loss`` in float32 in one
    process against the float64 oracle, plus one float32 rounding for each operation the job adds per
    element: the phase-2 merge across ``ranks`` hosts, the sum of the ranks' shares, and the average
    over all ranks (scaling by powers of two is exact): ``2 + 2 * ranks`` roundings, as
    ``tools/multi_gpu_check.py`` counts them."""
    assert set(got) == set(oracle), set(got) ^ set(oracle)
    extra = (2 + 2 * ranks) * EPS32
    for name, ref in oracle.items():
        err = float((got[name].double() - ref).norm() / ref.norm())
        plain_err = float((plain[name] - ref).norm() / ref.norm())
        assert err <= 2 * plain_err + extra, f"{name}: off by {err:.2e}, plain float32 {plain_err:.2e}"


# -- DeepSpeed: 2 processes, ZeRO-2, one sequence-parallel group of 2 ------------------------------------

@pytest.fixture(scope="module")
def deepspeed_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    ds_config = tmp / "zero2-small-buckets.json"
    # buckets of 2000 elements: ZeRO-2 reduces many buckets during the backward pass, so a rank that
    # filled them in another order than its peer would sum the wrong gradients
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 2000,
                                                           "allgather_bucket_size": 2000}}))
    out, grads = tmp / "out", tmp / "grads.pt"
    run = ["--model", tiny_dir, *COMMON, "--sp-size", "2", "--deepspeed", str(ds_config), "--steps", "5",
           "--gradient-accumulation-steps", "2", "--save-every", "2"]
    extra = ["--wandb", "star-sp-test", "--eval-after", "--eval-tasks", "niah_single_1", "--eval-lengths", "128",
             "--eval-samples", "1", "--eval-block-size", "1/2", "--eval-anchor-size", "block"]
    result = _launch(_deepspeed(), ["tests/test_finetune.py", "--grads-out", str(grads), "--out", str(out), *run, *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, grads, run


@pytest.mark.slow
def test_deepspeed_first_step_gradients_match_the_oracle(deepspeed_run, tiny_dir):
    out, grads, _ = deepspeed_run
    samples = _samples(tiny_dir, 0, 2, [0])
    oracle, plain = _reference_gradients(tiny_dir, samples, 0.5)
    _assert_gradients(torch.load(grads), oracle, plain, ranks=2)


@pytest.mark.slow
def test_deepspeed_resume_continues_the_run(deepspeed_run, tmp_path):
    """The run's checkpoint at step 4 (ZeRO-2 shards of the float32 master weights and Adam moments,
    the schedule) resumed for step 5 gives the run's own step 5, to the bit."""
    import shutil

    out, _, run = deepspeed_run
    resumed = tmp_path / "out"
    shutil.copytree(out / "checkpoint-0000004", resumed / "checkpoint-0000004")
    result = _launch(_deepspeed(), ["launch/finetune.py", "--out", str(resumed), *run])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    whole, parts = _state(out / "checkpoint-0000005", optimizer=False), _state(resumed / "checkpoint-0000005",
                                                                               optimizer=False)
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    machine = ("tokens_per_s", "peak_memory_gb")
    assert {k: v for k, v in _rows(out)[5].items() if k not in machine} == \
        {k: v for k, v in _rows(resumed)[5].items() if k not in machine}


@pytest.mark.slow
def test_deepspeed_zero3_star_gradients_match_the_oracle(tiny_dir, tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0) and buckets of 2000 elements, on
    one Star group of 2: step 0's two samples are a context of two blocks and one of a single block
    (rank 0 idle). Its gradients must be the oracle's, as ZeRO-2's are. It fails (gloo: "Received data
    size doesn't match", or a timeout with an idle rank) without ``passes._same_backward``, which makes
    every rank run the same modules' backward."""
    ds_config = tmp_path / "zero3-all-partitioned.json"
    ds_config.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 2000,
        "stage3_prefetch_bucket_size": 2000}}))
    grads = tmp_path / "grads.pt"
    # the tasks' seed 3 with 1-2 blocks: step 0 draws 2 blocks, then 1; step 1 runs on the traced order
    result = _launch(_deepspeed(), ["tests/test_finetune.py", "--grads-out", str(grads),
                                    "--out", str(tmp_path / "out"), "--model", tiny_dir, *COMMON, "--blocks", "1,2",
                                    "--sp-size", "2", "--deepspeed", str(ds_config), "--steps", "2",
                                    "--gradient-accumulation-steps", "2", "--collective-timeout-s", "30"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    samples = _samples(tiny_dir, 0, 2, [0], blocks=[1, 2])
    assert [-(-s.context_ids.shape[1] // s.block_size) for s in samples] == [2, 1]
    oracle, plain = _reference_gradients(tiny_dir, samples, 0.5)
    _assert_gradients(torch.load(grads), oracle, plain, ranks=2)


def _mean_loss(model_dir, samples) -> float:
    from transformers import AutoModelForCausalLM

    from star_sp.training import star_train_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return sum(float(star_train_loss(model, s.context_ids, s.target_ids, s.labels,
                                         StarConfig(block_size=s.block_size, anchor_size=s.anchor_size),
                                         context_loss_weight=0.5)) for s in samples) / len(samples)


@pytest.mark.slow
def test_deepspeed_loss_falls_and_checkpoints_load(deepspeed_run, tiny_dir):
    out, _, _ = deepspeed_run
    rows = _rows(out)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for row in rows.values():  # the parts add up to the loss
        assert abs(row["answer_loss"] + 0.5 * row["context_loss"] - row["loss"]) <= 1e-5 * row["loss"]
    assert [os.path.basename(p) for p in sorted(glob.glob(str(out / "checkpoint-*")))] == \
        ["checkpoint-0000004", "checkpoint-0000005"]  # keep_last 2 deleted checkpoint-0000002
    # The loss falls on the same samples: those it trained on and unseen ones. Each step's own loss is
    # of a different sample (another task), so the samples are scored again before and after: Adam at
    # lr 1e-2 on the random tiny model takes the loss (answer + 0.5 * context, 7.2 at the start) to
    # 4.6 on the ten samples it saw and to 5.7 on ten others (measured); a nat and half a nat are the
    # margins asserted
    final = str(out / "checkpoint-0000005")
    seen = [s for step in range(5) for s in _samples(tiny_dir, step, 2, [0])]
    unseen = [s for step in range(100, 105) for s in _samples(tiny_dir, step, 2, [0])]
    assert _mean_loss(final, seen) < _mean_loss(tiny_dir, seen) - 1.0
    assert _mean_loss(final, unseen) < _mean_loss(tiny_dir, unseen) - 0.5
    _assert_generate_loads(final)


def _assert_generate_loads(path: str) -> None:
    """``star-sp generate --model CHECKPOINT`` runs (exit code 0) on the saved folder as it is."""
    from star_sp.apps.cli import main

    ids = os.path.join(path, "..", "context-ids.txt")
    with open(ids, "w") as f:
        f.write(" ".join(map(str, range(5, 45))))
    assert main(["generate", "--model", path, "--context-ids", ids, "--query-ids", "7 8 9", "--block-size", "16",
                 "--max-new-tokens", "3", "--dtype", "float32", "--quiet", "--json"]) == 0


def _wandb_records(path: str):
    """The records of an offline W&B run file (LevelDB log format: 7-byte header, 32 KiB blocks,
    records of [crc 4][length 2][type 1][data], type 1 whole, 2/3/4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):
            pos += left if left < 7 else left  # the rest of the block is padding
            continue
        chunks += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_keys(deepspeed_run):
    out, _, _ = deepspeed_run
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    history, config, artifacts = {}, {}, []
    for record in _wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
        elif kind in ("run", "config"):  # the config comes with the run record, updates after it
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "artifact":
            artifacts.append((record.artifact.type, sorted(f.path for f in record.artifact.manifest.contents)))
    for step in range(1, 6):
        for key in ("loss", "answer_loss", "context_loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb"):
            assert f"train/{key}" in history[step], (step, key, sorted(history[step]))
        assert history[step]["train/loss"] == pytest.approx(_rows(out)[step]["loss"])
    assert config["sp_size"] == 2 and config["engine"] == "deepspeed ZeRO-2" and config["lengths"] == [100, 160]
    assert any(k.startswith("average/") for s in history.values() for k in s), "no evaluation summary logged"
    assert ("evaluation", ["accuracy_vs_block_anchor.png", "accuracy_vs_length.png", "summary.json",
                           "summary.md"]) in artifacts, artifacts


# -- plain PyTorch, 4 ranks of the pool: 2 sequence-parallel groups of 2 -----------------------------------

@pytest.mark.slow
def test_plain_pytorch_gradients_match_the_oracle(cluster, tiny_dir, tmp_path):
    """Four ranks of the gloo pool (the job takes its group as a launcher's; torchrun itself is tested in
    ``test_torchrun_bad_setting_one_line`` and ``test_launch.py``): every rank's step-0 gradients, averaged
    over the two data-parallel groups, are the oracle's."""
    out = tmp_path / "out"
    argv = ["--model", tiny_dir, "--out", str(out), *COMMON, "--sp-size", "2", "--steps", "3",
            "--gradient-accumulation-steps", "1"]
    results = cluster(4).run(finetune_gradients, argv, timeout_s=300)
    samples = _samples(tiny_dir, 0, 1, [0, 1])  # the two data-parallel groups' samples, averaged
    oracle, plain = _reference_gradients(tiny_dir, samples, 0.5)
    for grads in results:
        _assert_gradients(grads, oracle, plain, ranks=2)
    rows = _rows(out)
    assert rows[3]["loss"] < rows[1]["loss"], [r["loss"] for r in rows.values()]
    assert rows[1]["tokens"] == sum(s.tokens for s in samples)


# -- one process: resume, the control, bad settings --------------------------------------------------

def _run(argv) -> int:
    from star_sp.apps.jobs.finetune import main

    return main([str(a) for a in argv])


def _state(path, optimizer: bool = True):
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "model.safetensors"))
    return (weights, torch.load(os.path.join(path, "optimizer.pt"))) if optimizer else weights


class _Crash(Exception):
    pass


def _crash_at(step_to_crash: int):
    def inspect(step, grads):
        if step == step_to_crash:
            raise _Crash()
    return inspect


def test_resume_continues_as_an_uninterrupted_run(tiny_dir, tmp_path):
    """Stopped in step 3 after a checkpoint at step 2, rerun: the same weights, Adam moments,
    schedule and log as four steps in one go (float32 in one process is deterministic: equal to the
    bit)."""
    from star_sp.apps.jobs.finetune import main

    args = ["--model", tiny_dir, *COMMON, "--warmup-steps", "1", "--gradient-accumulation-steps", "2", "--steps", 4]
    assert _run([*args, "--out", tmp_path / "whole"]) == 0
    with pytest.raises(_Crash):
        main([str(a) for a in [*args, "--out", tmp_path / "parts", "--save-every", 2]], inspect=_crash_at(2))
    assert os.listdir(tmp_path / "parts" / "checkpoint-0000002") and sorted(_rows(tmp_path / "parts")) == [1, 2]
    assert _run([*args, "--out", tmp_path / "parts", "--save-every", 2]) == 0
    whole_w, whole_opt = _state(tmp_path / "whole" / "checkpoint-0000004")
    parts_w, parts_opt = _state(tmp_path / "parts" / "checkpoint-0000004")
    assert whole_w.keys() == parts_w.keys()
    for name in whole_w:
        assert torch.equal(whole_w[name], parts_w[name]), name
    assert whole_opt["scheduler"] == parts_opt["scheduler"]
    for a, b in zip(whole_opt["optimizer"]["state"].values(), parts_opt["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    machine = ("tokens_per_s", "peak_memory_gb")
    strip = lambda row: {k: v for k, v in row.items() if k not in machine}  # noqa: E731
    whole_rows, parts_rows = _rows(tmp_path / "whole"), _rows(tmp_path / "parts")
    assert [strip(r) for r in whole_rows.values()] == [strip(r) for r in parts_rows.values()]
    _assert_generate_loads(str(tmp_path / "parts" / "checkpoint-0000004"))


def test_global_loss_matches_the_oracle(tiny_dir):
    """``--attention global``'s loss is ``star_train_loss``'s loss for the plain causal model: the
    float64 oracle with one block (``M_star`` is then the causal mask), at 1e-9 as in test_training."""
    from transformers import AutoModelForCausalLM

    from star_sp.apps.jobs.objective import global_train_loss

    model = exact_norms(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64))
    for s in _samples(tiny_dir, 0, 2, [0]):
        for weight in (0.0, 0.7):
            lc = s.context_ids.shape[1]
            ref_loss, ref_grads = oracle_train(model, s.context_ids, s.target_ids, s.labels, lc, lc, weight)
            model.zero_grad()
            loss, answer, context = global_train_loss(model, s.context_ids, s.target_ids, s.labels,
                                                       context_loss_weight=weight)
            loss.backward()
            assert abs(loss.item() - ref_loss.item()) <= 1e-9 * ref_loss.item()
            assert context is None if weight == 0 else abs(answer + weight * context - loss.detach()) <= 1e-12
            for name, p in model.named_parameters():
                assert (p.grad - ref_grads[name]).norm() <= 1e-9 * ref_grads[name].norm(), name


def test_star_loss_parts_come_from_the_one_training_forward(tiny_dir):
    """``TrainModule`` logs the answer and context parts of star's loss from the training forward itself
    (``star_train_loss(return_parts=True)``), not from a second forward: the decoder runs as often as for
    the loss alone, and the parts are the float64 oracle's (1e-9 relative, as in test_training: both
    sides in float64 with exact RMSNorm, differing only in summation order)."""
    from transformers import AutoModelForCausalLM

    from star_sp.training import star_train_loss
    from star_sp.apps.jobs.objective import TrainModule

    model = exact_norms(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64))
    runs = []
    model.model.register_forward_pre_hook(lambda module, args: runs.append(1))
    weight = 0.5
    s = _samples(tiny_dir, 0, 1, [0])[0]
    cfg = StarConfig(block_size=s.block_size, anchor_size=s.anchor_size)
    star_train_loss(model, s.context_ids, s.target_ids, s.labels, cfg, context_loss_weight=weight)
    alone, runs[:] = len(runs), []
    module = TrainModule(model, attention="star", sp=None, sp_rank=0, context_loss_weight=weight)
    share, info = module(s)
    assert len(runs) == alone, f"the decoder ran {len(runs)} times for the loss and its parts, {alone} for the loss"
    answer, _ = oracle_train(model, s.context_ids, s.target_ids, s.labels, s.block_size, s.anchor_size, 0.0)
    total, _ = oracle_train(model, s.context_ids, s.target_ids, s.labels, s.block_size, s.anchor_size, weight)
    context = (total - answer) / weight
    assert abs(info["loss"] - total.item()) <= 1e-9 * total.item() and float(share.detach()) == info["loss"]
    assert abs(info["answer_loss"] - answer.item()) <= 1e-9 * answer.item()
    assert abs(info["context_loss"] - context.item()) <= 1e-9 * context.item()
    assert TrainModule(model, attention="star", sp=None, sp_rank=0, context_loss_weight=0.0)(s)[1]["context_loss"] \
        is None


def test_samples_are_drawn_from_the_step_and_never_from_evaluation_seeds(tiny_dir, monkeypatch):
    import random

    from transformers import AutoTokenizer

    from star_sp.eval.tasks import generate
    from star_sp.apps.jobs.data import IGNORE_INDEX, TaskData

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    data = TaskData(tok, ["niah_single_1", "vt"], [100, 160], [2, 4], [0.25, 1.0], 0)
    a, b, other = data.sample(5, 1, 0), data.sample(5, 1, 0), data.sample(5, 1, 1)
    assert torch.equal(a.context_ids, b.context_ids) and (a.block_size, a.anchor_size) == (b.block_size, b.anchor_size)
    assert a.context_ids.shape != other.context_ids.shape or not torch.equal(a.context_ids, other.context_ids)
    for step in range(12):
        s = data.sample(step, 0, 0)
        lc = s.context_ids.shape[1]
        assert -(-lc // 4) <= s.block_size <= -(-lc // 2)  # 2 to 4 blocks, rounded up
        assert round(0.25 * s.block_size) <= s.anchor_size <= s.block_size
        assert s.tokens <= 160
        answer = s.labels[s.labels != IGNORE_INDEX]
        assert answer[-1] == tok.eos_token_id and torch.equal(answer, s.target_ids[0, -len(answer):])

    # every string a random stream is seeded with: evaluation's start with its integer seed, training's
    # with "train" (so they never meet, whatever the seeds)
    seeds = []

    class Recording(random.Random):
        def seed(self, a=None, version=2):
            seeds.append(a)
            super().seed(a, version)

    monkeypatch.setattr(random, "Random", Recording)
    for seed in (0, 7, -3):
        generate("niah_single_1", 128, 1, lambda t: len(tok(t)["input_ids"]), seed=seed)
    eval_seeds, seeds[:] = list(seeds), []
    TaskData(tok, ["niah_single_1", "vt"], [100, 160], [2, 4], [0.25, 1.0], 0).sample(3, 1, 0)
    assert eval_seeds and seeds
    assert all(isinstance(x, str) and x.split("/")[0].lstrip("-").isdigit() for x in eval_seeds), eval_seeds
    assert all(isinstance(x, str) and x.split("/")[0] in ("train", "train-fit") for x in seeds), seeds


def test_background_workers_give_the_same_samples_in_order(tiny_dir):
    from transformers import AutoTokenizer

    from star_sp.apps.jobs.data import TaskData, samples

    data = TaskData(AutoTokenizer.from_pretrained(tiny_dir), ["niah_single_1", "vt"], [100, 160], [2, 4], [0, 1], 0)
    here = list(samples(data, 1, 4, 2, 1, workers=0))
    there = list(samples(data, 1, 4, 2, 1, workers=2))
    assert len(here) == len(there) == 6
    for a, b in zip(here, there):
        assert torch.equal(a.context_ids, b.context_ids) and torch.equal(a.labels, b.labels)
        assert (a.block_size, a.anchor_size) == (b.block_size, b.anchor_size)


def test_jsonl_data_and_its_errors(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from star_sp import StarInputError
    from star_sp.apps.jobs.data import JsonlData

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"context": f"the key is {i} . " * 5, "query": "what is the key ?",
                                          "answer": f" {i}"}) for i in range(3)) + "\n")
    data = JsonlData(str(path), tok, [2, 2], [1, 1], 0, accumulation=1, dp_size=2)
    answer = lambda s: int(tok.decode(s.labels[s.labels != -100][:-1]))  # noqa: E731 - the digit before EOS
    seen = [answer(data.sample(0, 0, d)) for d in range(2)] + [answer(data.sample(1, 0, 0))]
    assert sorted(seen) == [0, 1, 2]  # one epoch: every record once
    for text, words in [("{not json", "line 1 is not JSON"), ('{"context": "a", "query": "b"}',
                                                             "line 1 needs a non-empty string 'answer'"),
                        ("", "holds no records")]:
        path.write_text(text)
        with pytest.raises(StarInputError, match=words):
            JsonlData(str(path), tok, [2, 2], [1, 1], 0, accumulation=1, dp_size=1)


BAD = [  # flags -> the one line a user sees
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--lengths", "300,100"], "lengths must be two integers [low, high] with low <= high, got [300, 100]"),
    (["--anchor-fraction", "0,2"], "anchor_fraction must lie in [0, 1] (a fraction of the block), got [0.0, 2.0]"),
    (["--sp-size", "0"], "sp_size must be an integer >= 1, got 0"),
    (["--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
]


def test_bad_settings_give_one_line(tiny_dir, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    toml = tmp_path / "run.toml"
    toml.write_text('model = "x"\nlearning_rate = 1\n')
    cases = [*BAD,
             (["--deepspeed", ds], f"the DeepSpeed config {ds} sets optimizer, which the run config sets (optimizer: "
                                   "lr, adam_betas, adam_eps, weight_decay); remove them or set them to \"auto\""),
             (["--config", toml], f"config file {toml} has unknown keys ['learning_rate']"),
             (["--data", tmp_path / "missing.jsonl"], "cannot read the data file")]
    for flags, words in cases:
        assert _run(["--model", tiny_dir, "--out", tmp_path / "out", *COMMON, *flags]) == 1, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("star-sp finetune: error: ") and words in err[0], (flags, err)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    assert _run(["--model", tiny_dir, *COMMON, "--deepspeed", ds, "--sp-size", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"star-sp finetune: error: the DeepSpeed config {ds} has ZeRO stage 4; use 0, 1, 2 or 3"], err


def test_errors_and_ctrl_c_are_told_as_the_cli_tells_them_with_the_job_name(monkeypatch, tmp_path, capsys):
    """The job reports through ``star_sp.apps.report`` under its own name: an error of one rank is marked
    with that rank, on stderr and in torchrun's error file; an error every rank has is printed by the
    host's first process alone; Ctrl-C is one line and exit code 130."""
    from star_sp import StarError
    from star_sp.apps.report import on_every_rank, report
    from star_sp.apps.jobs import finetune as job

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def fails(exc):
        def run(cfg, inspect=None):
            raise exc
        return run

    monkeypatch.setattr(job, "run", fails(StarError("the disk is full")))
    assert job.main(["--model", "m"]) == 1
    line = "star-sp finetune (rank 1): error: the disk is full"
    assert capsys.readouterr().err == line + "\n"
    assert json.loads(error_file.read_text())["message"]["message"] == line
    monkeypatch.setattr(job, "run", fails(on_every_rank(StarError("the same on every rank"))))
    assert job.main(["--model", "m"]) == 1 and capsys.readouterr().err == ""  # LOCAL_RANK 0 says it
    report("star-sp finetune: error: x", everywhere=False, prog="star-sp finetune")
    report("star-sp: error: x", everywhere=False)  # the command's name by default
    assert capsys.readouterr().err == "star-sp finetune (rank 1): error: x\nstar-sp (rank 1): error: x\n"

    script = ("import os, signal, sys, time\n"
              "from star_sp.apps.jobs import finetune as job\n"
              "def run(cfg, inspect=None):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(60)\n"
              "job.run = run\n"
              "sys.exit(job.main(['--model', 'm']))\n")
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(env, PYTHONPATH=REPO),
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "star-sp finetune: interrupted\n"), result


def finetune_rank(group, argv: list[str]) -> tuple[int, str]:
    """On a test cluster's rank: the job's exit code and what it printed on stderr."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = _run(argv)
    return code, err.getvalue()


def finetune_gradients(group, argv: list[str]) -> dict:
    """On a test cluster's rank: the job, returning step 0's full gradients."""
    from star_sp.apps.jobs.finetune import main

    seen = {}
    assert main(argv, inspect=lambda step, grads: seen.setdefault(step, grads)) == 0
    return seen[0]


@pytest.mark.slow
@pytest.mark.parametrize("attention", [["--attention", "global"], ["--attention", "star", "--global-fraction", "1"]],
                         ids=["control", "star-all-steps-global"])
def test_global_control_gradients_match_the_oracle(cluster, tiny_dir, tmp_path, attention):
    """``--attention global`` on a sequence-parallel group of 2 (plain PyTorch): every rank runs the
    plain model, the first carries the loss, and the summed gradients are the plain causal model's. A
    star run whose every micro-batch is a mixed-in global one (``--global-fraction 1``) is the same."""
    from transformers import AutoModelForCausalLM

    from star_sp.apps.jobs.objective import global_train_loss

    argv = ["--model", tiny_dir, "--out", str(tmp_path), *COMMON, *attention, "--sp-size", "2",
            "--steps", "1", "--gradient-accumulation-steps", "2"]
    results = cluster(2).run(finetune_gradients, argv)
    samples = _samples(tiny_dir, 0, 2, [0])
    model64 = exact_norms(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64))
    model32 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    oracle = {}
    for s in samples:
        lc = s.context_ids.shape[1]  # one block: M_star is the causal mask
        _, grads = oracle_train(model64, s.context_ids, s.target_ids, s.labels, lc, lc, 0.5)
        oracle = {n: oracle.get(n, 0) + g / len(samples) for n, g in grads.items()}
        loss, _, _ = global_train_loss(model32, s.context_ids, s.target_ids, s.labels, context_loss_weight=0.5)
        (loss / len(samples)).backward()
    plain = {n: p.grad.double() for n, p in model32.named_parameters()}
    for grads in results:
        _assert_gradients(grads, oracle, plain, ranks=2)


@pytest.mark.slow
def test_memory_settings_keep_the_oracle_gradients(cluster, tiny_dir, tmp_path):
    """``gradient_checkpointing``, ``offload_activations`` and a ``loss_chunk_tokens`` below the rows the loss
    reads, on a sequence-parallel group of 2 (plain PyTorch): the gradients are still the oracle's, within
    the bound of the runs without them (``_assert_gradients``); offload without checkpointing is one line."""
    argv = ["--model", tiny_dir, "--out", str(tmp_path), *COMMON, "--sp-size", "2", "--steps", "1",
            "--gradient-accumulation-steps", "2", "--gradient-checkpointing", "--offload-activations",
            "--offload-layers", "1", "--loss-chunk-tokens", "7"]
    results = cluster(2).run(finetune_gradients, argv)
    oracle, plain = _reference_gradients(tiny_dir, _samples(tiny_dir, 0, 2, [0]), 0.5)
    for grads in results:
        _assert_gradients(grads, oracle, plain, ranks=2)
    from star_sp import StarInputError
    from star_sp.apps.jobs.settings import FinetuneConfig

    with pytest.raises(StarInputError, match="offload_activations offloads what gradient checkpointing keeps; set "
                                             "gradient_checkpointing = true too"):
        FinetuneConfig(model=tiny_dir, offload_activations=True)
    with pytest.raises(StarInputError, match="offload_layers = 1 applies to offload_activations; set "
                                             "offload_activations = true too"):
        FinetuneConfig(model=tiny_dir, gradient_checkpointing=True, offload_layers=1)


@pytest.mark.slow
def test_bad_setting_stops_every_rank_with_one_line(cluster, tiny_dir, tmp_path):
    """Two ranks: a bad value (the same on both) and a world the groups cannot divide end both ranks
    with exit code 1 and the same line, printed once (by the host's first process)."""
    for flags, words in [(["--lr", "-1"], "lr must be a finite number > 0"),
                         (["--sp-size", "3"], "sp_size 3 does not divide the 2 processes")]:
        results = cluster(2).run(finetune_rank, ["--model", tiny_dir, "--out", str(tmp_path), *COMMON, *flags])
        assert [code for code, _ in results] == [1, 1]
        assert results[0][1].count("\n") == 1 and words in results[0][1] and results[1][1] == "", results


@pytest.mark.slow
def test_torchrun_bad_setting_one_line(tiny_dir):
    result = _launch([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"],
                     ["launch/finetune.py", "--model", tiny_dir, "--lr", "-1"], timeout=120)
    line = "star-sp finetune: error: lr must be a finite number > 0, got -1.0"
    assert result.returncode == 1
    assert result.stderr.splitlines().count(line) == 1, result.stderr  # torchrun's report quotes it as well


def test_global_fraction_mixes_global_micro_batches_alike_on_every_rank(tiny_dir):
    """``global_fraction``: about that share of the micro-batches trains under global attention, drawn per
    (step, micro-batch) alone (every data-parallel rank alike), from a stream of its own (the samples
    themselves are those of a run without it); a bad value or a run that is global already is one line."""
    from transformers import AutoTokenizer

    from star_sp import StarInputError
    from star_sp.apps.jobs.data import TaskData
    from star_sp.apps.jobs.settings import FinetuneConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    plain = TaskData(tokenizer, TASKS.split(","), [100, 160], [2, 4], [0, 1], 3)
    mixed = TaskData(tokenizer, TASKS.split(","), [100, 160], [2, 4], [0, 1], 3, global_fraction=0.5)
    keys = [(step, micro) for step in range(20) for micro in range(2)]
    choice = {}
    for step, micro in keys:
        a, b = (mixed.sample(step, micro, dp) for dp in (0, 1))
        assert a.attention == b.attention and a.attention in ("", "global")
        reference = plain.sample(step, micro, 0)
        assert torch.equal(a.context_ids, reference.context_ids) and reference.attention == ""
        choice[(step, micro)] = a.attention
    share = sum(v == "global" for v in choice.values()) / len(keys)
    assert 0.25 <= share <= 0.75, share  # 40 fair draws: outside this 1 time in 800
    for bad, words in ((dict(global_fraction=1.5), "global_fraction must be a share between 0 and 1"),
                       (dict(attention="global", global_fraction=0.5), "global_fraction mixes global-attention steps"),
                       (dict(prompt="html"), "prompt must be one of auto, plain, chat")):
        with pytest.raises(StarInputError, match=words):
            FinetuneConfig(model=tiny_dir, **bad)


def test_lora_table_trains_the_adapters_alone_and_generate_loads_base_and_adapter(tiny_dir, tmp_path):
    """A ``[lora]`` table: the job trains peft's adapters on q_proj and v_proj (the base unchanged), saves
    them in peft's layout, and ``--model`` of the commands loads base + adapter, whose q_proj weight is the
    base's plus ``alpha / rank * B @ A`` from the saved adapter file; a bad table is one line."""
    pytest.importorskip("peft", reason="peft is not installed (pip install star-sp[lora])")
    from safetensors.torch import load_file

    from star_sp import StarInputError
    from star_sp.apps.model_arg import load_model, model_config
    from star_sp.apps.runconfig import RunConfig
    from star_sp.apps.jobs.settings import FinetuneConfig

    config = tmp_path / "lora.toml"
    config.write_text('[lora]\nrank = 4\nalpha = 8.0\ntarget_modules = ["q_proj", "v_proj"]\n')
    out = tmp_path / "out"
    assert _run(["--config", config, "--model", tiny_dir, "--out", out, *COMMON, "--deepspeed", "", "--steps", "2"]) == 0
    saved = sorted(out.glob("checkpoint-*"))[-1]
    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()
    adapter = load_file(saved / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter), sorted(adapter)
    base = load_file(os.path.join(tiny_dir, "model.safetensors"))
    path, cfg = model_config(RunConfig(model=str(saved)))
    model = load_model(RunConfig(model=str(saved), dtype="float32"), path, cfg, torch.device("cpu"), progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert b.abs().max() > 0  # trained: peft starts B at zero
    expected = base[name] + (8.0 / 4) * b @ a
    assert torch.allclose(model.state_dict()[name], expected, rtol=0, atol=1e-6)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(StarInputError, match=r"the \[lora\] table needs exactly the keys \('rank', 'alpha', "
                                             r"'target_modules'\), got \['rank'\]"):
        FinetuneConfig(model=tiny_dir, lora={"rank": 4})
