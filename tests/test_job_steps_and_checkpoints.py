"""The plain-PyTorch optimizer step with data parallelism, and the checkpoint folder's bookkeeping.

Bugs these localize: a trainable parameter that no rank's loss reached (or only some ranks') making
the data-parallel step crash or take a wrong mean; ``prune`` leaving the folders of interrupted
saves behind; a checkpoint state that rank 0 cannot read leaving the other ranks waiting in the
resume look-up's broadcast until the collective timeout instead of the same one-line error.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from star_sp.errors import StarInputError

# a regression hangs in a collective: the pool's gloo timeout is 30 s, so a call still running at
# 20 s fails the test (and restarts the pool) instead of passing after the timeout
PROMPT_S = 20.0


# -- TorchStepper: data parallelism with parameters some or all ranks leave without a gradient ------

class _Toy(torch.nn.Module):
    """Rank loss ``sum(used * x) [+ sum(rank0_only * y)]``; ``unused`` is in no loss."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        self.rank0_only = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
        self.unused = torch.nn.Parameter(torch.tensor([2.0, 4.0]))

    def forward(self, sample):
        x, y = sample
        loss = (self.used * x).sum()
        if y is not None:
            loss = loss + (self.rank0_only * y).sum()
        return loss, {"loss": float(loss.detach())}


SAMPLES = {0: (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, -8.0])),
           1: (torch.tensor([3.0, 0.0, -1.0]), None)}
LR, WEIGHT_DECAY = 0.1, 0.5


def dp_step(group) -> dict:
    """On a test cluster's rank (sp 1, dp 2): one TorchStepper step of ``_Toy`` on this rank's sample;
    the gradients the step saw, its gradient norm and the parameters after it."""
    from star_sp.apps.jobs.groups import GroupLayout, TrainGroups
    from star_sp.apps.jobs.settings import FinetuneConfig
    from star_sp.apps.jobs.steppers import TorchStepper

    rank = dist.get_rank(group)
    groups = TrainGroups(layout=GroupLayout(2, rank, 1), world=group, sp=None, dp=group)
    cfg = FinetuneConfig(model="toy", steps=1, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=0.0,
                         collective_timeout_s=PROMPT_S)
    module = _Toy()
    stepper = TorchStepper(module, cfg, groups, torch.float32)
    seen = {}
    stepper.micro_step(SAMPLES[rank], boundary=True, inspect=seen.update)
    return {"grads": seen, "grad_norm": stepper.stats()["grad_norm"],
            "params": {n: p.detach().clone() for n, p in module.named_parameters()}}


def test_data_parallel_step_with_parameters_unused_on_some_or_all_ranks(cluster):
    """The step's gradient is the mean over the 2 data-parallel ranks of each rank's gradient, where a
    rank whose loss did not reach a parameter contributes zeros: ``(x0 + x1) / 2`` for ``used``,
    ``y / 2`` for ``rank0_only``, zeros for ``unused`` (which AdamW's weight decay still shrinks). The
    first AdamW step is ``p (1 - lr wd) - lr g / (|g| + eps)``; the same on both ranks."""
    x0, y0 = SAMPLES[0]
    x1, _ = SAMPLES[1]
    grads = {"used": (x0 + x1) / 2, "rank0_only": y0 / 2, "unused": torch.zeros(2)}
    start = _Toy()
    params = {n: p.detach() * (1 - LR * WEIGHT_DECAY) - LR * grads[n] / (grads[n].abs() + 1e-8)
              for n, p in start.named_parameters()}
    norm = float(torch.cat(list(grads.values())).norm())
    results = cluster(2).run(dp_step, timeout_s=60)
    for result in results:
        assert set(result["grads"]) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=0)
            torch.testing.assert_close(result["params"][name], params[name], rtol=1e-6, atol=1e-6)
        assert result["grad_norm"] == pytest.approx(norm, rel=1e-6)


# -- prune ---------------------------------------------------------------------------------------------

def _checkpoint(out, step: int, complete: bool) -> None:
    from star_sp.apps.jobs.checkpoints import STATE_FILE, checkpoint_dir

    path = checkpoint_dir(str(out), step)
    os.makedirs(path)
    with open(os.path.join(path, "model.safetensors"), "w") as f:
        f.write("weights")
    if complete:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump({"step": step, "tokens": 10 * step, "world_size": 1, "config": {}}, f)


@pytest.mark.parametrize("keep_last, kept", [(2, [4, 6]), (1, [6]), (0, [2, 4, 6])])
def test_prune_deletes_incomplete_checkpoints_and_the_oldest_complete_ones(tmp_path, keep_last, kept):
    """Folders without ``trainer_state.json`` (saves cut off, older and newer than the last complete
    checkpoint) go whatever ``keep_last`` is; of the complete ones the newest ``keep_last`` stay (0:
    all); what is not a checkpoint folder stays."""
    from star_sp.apps.jobs.checkpoints import prune

    for step, complete in [(2, True), (3, False), (4, True), (5, False), (6, True), (8, False)]:
        _checkpoint(tmp_path, step, complete)
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    (tmp_path / "eval").mkdir()
    prune(str(tmp_path), keep_last)
    assert sorted(os.listdir(tmp_path)) == sorted([f"checkpoint-{s:07d}" for s in kept] + ["eval", "train_log.jsonl"])


# -- the resume look-up: rank 0 cannot read the last checkpoint's state ---------------------------------

def rank(group) -> int:
    return dist.get_rank(group)


def resume_lookup(group, out: str):
    """On a test cluster's rank: ``resume_point``'s error, as ``(type, message, on_every_rank)``."""
    from star_sp.apps.jobs.groups import GroupLayout
    from star_sp.apps.jobs.loop import resume_point
    from star_sp.apps.jobs.settings import FinetuneConfig

    cfg = FinetuneConfig(model="toy", out=out, collective_timeout_s=PROMPT_S)
    try:
        resume_point(cfg, group, GroupLayout(2, dist.get_rank(group), 1))
    except StarInputError as exc:
        return type(exc).__name__, str(exc), getattr(exc, "on_every_rank", False)
    return None


@pytest.mark.parametrize("text, problem", [("{\"step\": 4,", "is not valid JSON"),
                                           ("[4, 40]", "does not hold"),
                                           ("{\"step\": 4, \"world_size\": 2}", "does not hold")])
def test_unreadable_checkpoint_state_stops_every_rank_with_one_line(cluster, tmp_path, text, problem):
    """The last checkpoint's ``trainer_state.json`` truncated, not an object, or without the tokens
    and config: both ranks end at once with the same one-line ``StarInputError``, marked as raised on
    every rank (printed once), naming the file, what is wrong with it and what to do."""
    from star_sp.apps.jobs.checkpoints import STATE_FILE, checkpoint_dir

    _checkpoint(tmp_path, 2, complete=True)
    _checkpoint(tmp_path, 4, complete=True)
    state = os.path.join(checkpoint_dir(str(tmp_path), 4), STATE_FILE)
    with open(state, "w") as f:
        f.write(text)
    pool = cluster(2)
    assert pool.run(rank, timeout_s=120) == [0, 1]  # started: the bound below is the look-up's alone
    results = pool.run(resume_lookup, str(tmp_path), timeout_s=PROMPT_S)
    assert results[0] == results[1], results
    kind, message, everywhere = results[0]
    assert (kind, everywhere) == ("StarInputError", True)
    assert "\n" not in message and state in message and problem in message and "delete" in message, message
