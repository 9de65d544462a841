"""Weights & Biases tracking, optional: offline when there is no API key, never a failure for lack
of network. Without a project name every call is a no-op."""

from __future__ import annotations

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
