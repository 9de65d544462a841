"""Checkpoints of a fine-tuning run: ``OUT/checkpoint-NNNNNNN/``, one per saved step.

Each holds the model in the transformers layout (``config.json``, ``model.safetensors``, the
tokenizer files: ``star-sp generate --model`` and ``eval --model`` load it as it is), the optimizer
state (``optimizer.pt``, or DeepSpeed's ``deepspeed/`` folder with every rank's shard) and, written
last by rank 0 once every rank has saved, ``trainer_state.json``: the step, the tokens seen, the
world size and the run config. A folder without it is incomplete (a run stopped while saving): it
is never resumed from, and ``prune`` deletes it.
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


def _checkpoint_folders(out: str) -> list[tuple[int, str, bool]]:
    """``(step, path, complete)`` of every ``checkpoint-N`` folder in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = []
    for name in os.listdir(out):
        match = _NAME.match(name)
        path = os.path.join(out, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path, os.path.isfile(os.path.join(path, STATE_FILE))))
    return sorted(found)


def complete_checkpoints(out: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint in ``out``, oldest first."""
    return [(step, path) for step, path, complete in _checkpoint_folders(out) if complete]


def read_state(path: str) -> dict:
    """The checkpoint ``path``'s ``trainer_state.json``; a ``StarInputError`` (one line, naming the file)
    if it cannot be read or lacks the step, the tokens or the config."""
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    except ValueError as exc:  # not JSON, not UTF-8
        problem = f"is not valid JSON ({exc})"
    else:
        if _well_formed(state):
            return state
        problem = "does not hold a JSON object with an integer step and tokens and a config object"
    raise StarInputError(f"{file} {problem}; delete the folder {path} to use the checkpoint before it, if any")


def _well_formed(state) -> bool:
    return (isinstance(state, dict) and isinstance(state.get("config"), dict)
            and all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool) for k in ("step", "tokens")))


def write_state(path: str, state: dict) -> None:
    """Write ``trainer_state.json`` atomically (it marks the checkpoint complete)."""
    tmp = os.path.join(path, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(path, STATE_FILE))


def prune(out: str, keep_last: int) -> None:
    """Delete every incomplete checkpoint folder and all but the newest ``keep_last`` complete ones (0:
    keep every complete one). Rank 0 calls it right after a save has completed, before the next one
    starts, so an incomplete folder is what a stopped run left (never one being written)."""
    folders = _checkpoint_folders(out)
    complete = [path for _, path, done in folders if done]
    doomed = [path for _, path, done in folders if not done] + (complete[:-keep_last] if keep_last else [])
    for path in doomed:
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
