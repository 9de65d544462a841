"""Checkpoints of a fine-tuning run: ``OUT/checkpoint-NNNNNNN/``, one per saved step.

Each holds the model in the transformers layout (``config.json``, ``model.safetensors``, the
tokenizer files: ``star-sp generate --model`` and ``eval --model`` load it as it is), the optimizer
state (``optimizer.pt``, or DeepSpeed's ``deepspeed/`` folder with every rank's shard) and, written
last by rank 0 once every rank has saved, ``trainer_state.json``: the step, the tokens seen, the
world size and the run config. A folder without it is incomplete (a run stopped while saving) and
is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from ...errors import StarInputError
from .settings import RESUMABLE_CHANGES

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, f"checkpoint-{step:07d}")


def complete_checkpoints(out: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = []
    for name in os.listdir(out):
        match = _NAME.match(name)
        path = os.path.join(out, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def write_state(path: str, state: dict) -> None:
    """Write ``trainer_state.json`` atomically (it marks the checkpoint complete)."""
    tmp = os.path.join(path, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(path, STATE_FILE))


def prune(out: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep all)."""
    if keep_last:
        for _, path in complete_checkpoints(out)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def resume_error(state: dict, config: dict, world_size: int, path: str) -> str | None:
    """Why the run described by ``config`` on ``world_size`` ranks cannot continue from the checkpoint
    whose ``trainer_state.json`` is ``state``; None if it can."""
    if state.get("world_size") != world_size:
        return (f"{path} was written by {state.get('world_size')} processes, this run has {world_size}; resume with "
                f"the same number of processes, or use another out folder to start afresh")
    saved = state.get("config", {})
    changed = sorted(k for k in set(saved) | set(config)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        return (f"{path} was made with other settings ({diffs}); resume with the same settings, or use another "
                f"out folder to start afresh")
    return None
