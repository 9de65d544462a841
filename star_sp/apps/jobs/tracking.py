"""W&B for a fine-tuning run (``star_sp.apps.tracking.Tracker``: offline without an API key; a no-op without
a project name or off rank 0).

Per logged step, under ``train/``: ``loss``, ``answer_loss``, ``context_loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``tokens``, ``peak_memory_gb``, ``block_size``, ``anchor_size``. After an evaluation
(``eval_after``): the star-against-global table, the averages and the two plots (``Tracker.log_summary``)
and an artifact of type ``evaluation`` holding ``summary.md``, ``summary.json`` and the PNGs.
"""

from __future__ import annotations

import json
import os

from ..tracking import Tracker

STEP_KEYS = ("loss", "answer_loss", "context_loss", "lr", "grad_norm", "tokens_per_s", "tokens", "peak_memory_gb",
             "block_size", "anchor_size")


class TrainTracker:
    def __init__(self, project: str, config: dict, out_dir: str, enabled: bool):
        self.tracker = Tracker(project or None, config, out_dir, enabled=enabled)

    @property
    def run(self):
        return self.tracker.run

    @property
    def directory(self) -> str | None:
        return self.tracker.directory

    def log_step(self, step: int, row: dict) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": row[k] for k in STEP_KEYS if row.get(k) is not None}, step=step)

    def log_eval(self, eval_dir: str, plots: list[str]) -> None:
        """The evaluation written to ``eval_dir`` by ``star-sp eval``: its table, averages and plots."""
        if self.run is None:
            return
        import wandb

        with open(os.path.join(eval_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(eval_dir, "summary.md")) as f:
            table = f.read()
        self.tracker.log_summary(summary, table, plots)
        artifact = wandb.Artifact(f"eval-{self.run.id}", type="evaluation",
                                  description="star-sp eval of the fine-tuned model: star against global attention")
        for name in ("summary.md", "summary.json"):
            artifact.add_file(os.path.join(eval_dir, name))
        for path in plots:
            artifact.add_file(path)
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        self.tracker.finish()
