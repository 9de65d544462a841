"""Weights & Biases tracking, optional: offline when there is no API key, never a failure for lack
of network. Without a project name every call is a no-op.

``Tracker``: an evaluation's run (``star-sp eval --wandb``). ``TrainTracker``: a training job's run, on rank
0 only. Per logged step, under ``train/``: ``loss``, ``answer_loss``, ``context_loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``tokens``, ``peak_memory_gb``, ``block_size``, ``anchor_size``. After an evaluation
(``eval_after``): the star-against-global table, the averages and the two plots (``Tracker.log_summary``)
and an artifact of type ``evaluation`` holding ``summary.md``, ``summary.json`` and the PNGs.
"""

from __future__ import annotations

import json
import os

from ..errors import StarInputError


def _netrc_has_wandb() -> bool:
    """A W&B login: an ``api.wandb.ai`` entry in ~/.netrc (any other netrc entry is no key)."""
    path = os.path.expanduser("~/.netrc")
    try:
        with open(path) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


class Tracker:
    def __init__(self, project: str | None, config: dict, out_dir: str, enabled: bool = True):
        self.run = None
        if not project or not enabled:
            return
        wandb = self.require()
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        self.run = wandb.init(project=project, config=config, dir=out_dir, mode=mode, reinit=True)

    @staticmethod
    def require():
        try:
            import wandb
        except ImportError:
            raise StarInputError("--wandb needs the wandb package: pip install 'star-sp[wandb]'") from None
        return wandb

    @property
    def directory(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log_row(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({f"score/{row['task']}/{row['length']}/{row['method']}": row["score"],
                          "prefill_s": row.get("prefill_s"), "generate_s": row.get("generate_s")})

    def log_summary(self, summary: dict, table_md: str, plots: list[str], extra: dict | None = None) -> None:
        if self.run is None:
            return
        import wandb

        rows = [[*key.split("|"), value] for key, value in sorted(summary["by_family"].items())]
        self.run.log({"summary": wandb.Table(columns=["family", "length", "method", "score"], data=rows),
                      **{f"average/{k}": v for k, v in summary["average"].items()},
                      **{f"ratio_to_global/{k}": v for k, v in summary["ratio_to_global"].items()},
                      **{os.path.basename(p): wandb.Image(p) for p in plots}, **(extra or {})})
        self.run.summary["table_markdown"] = table_md

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


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
