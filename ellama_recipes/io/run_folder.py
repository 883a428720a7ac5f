"""The run folder: what every stage (pretrain, sft, dpo) leaves in ``RUN/``, and what align, sweep, export and eval read.

::

    RUN/checkpoints/<run_name>--step=S-...   engine checkpoints (S = optimizer steps done), resumable
    RUN/metrics.jsonl                        one row per step (:mod:`ellama_recipes.io.metrics`)
    RUN/resume.json                          {"resumed_from": S or null}: where this attempt started
    RUN/complete.json                        {"stage", "train_steps", "checkpoint", "summary"}: the stage trained
                                             all its steps; "checkpoint" is its newest complete checkpoint
    RUN/logs/                                NeMo text logs, TensorBoard (logs/tb_logs), ranks > 0 (logs/ranks/)
    RUN/launch/                              NeMo-Run's launch files (torchrun / sbatch scripts, task logs)

:class:`RunFolder` names those parts; :func:`summarize` is the one way a stage's summary is read off its metrics
(each recipe says which values: :attr:`ellama_recipes.recipes.Recipe.summary`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ellama_recipes.io import metrics
from ellama_recipes.io.atomic import write_json

COMPLETE = "complete.json"
RESUME = "resume.json"


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "RunFolder":
        """The run folder at ``path`` (absolute: launched ranks run from another working directory)."""
        return cls(Path(path).expanduser().absolute())

    @classmethod
    def of(cls, cfg: Any) -> "RunFolder":
        """The run folder of a stage config (``cfg.checkpoint.out_dir``)."""
        return cls.at(cfg.checkpoint.out_dir)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / metrics.FILE

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def rank_logs(self) -> Path:
        """``logs/ranks/rank-N.log`` of ranks > 0 (a folder: NeMo moves the loose files of logs/ on restarts)."""
        return self.logs / "ranks"

    @property
    def launch(self) -> Path:
        return self.root / "launch"

    @property
    def complete_file(self) -> Path:
        return self.root / COMPLETE

    @property
    def resume_file(self) -> Path:
        return self.root / RESUME

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    # ------------------------------------------------------------------ records
    def read_metrics(self) -> list[dict[str, Any]]:
        return metrics.read_metrics(self.metrics)

    def resumed_from(self) -> int | None:
        rec = _read_json(self.resume_file)
        return rec.get("resumed_from") if rec else None

    def write_resumed(self, step: int | None) -> None:
        write_json(self.resume_file, {"resumed_from": step}, indent=None)

    def read_complete(self) -> dict[str, Any] | None:
        """The completion record (None when absent or unreadable: the stage has not finished)."""
        return _read_json(self.complete_file)

    def write_complete(self, stage: str, train_steps: int, checkpoint: str | Path | None,
                       summary: dict[str, Any] | None = None) -> dict[str, Any]:
        rec = {"stage": stage, "train_steps": int(train_steps),
               "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None, "summary": summary or {}}
        write_json(self.complete_file, rec)
        return rec


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


# What a summary field reads: ("first" | "last", metrics key).
SummaryFields = Mapping[str, tuple[str, str]]


def summarize(run_dir: str | Path, stage: str, fields: SummaryFields, *, step_key: str) -> dict[str, Any]:
    """A stage's summary of its run folder: ``stage``, ``final_step`` (the last row with ``step_key``), each of
    ``fields`` (``name: ("first" | "last", key)``), ``resumed_from``, ``out_dir`` and ``metrics``."""
    run = RunFolder.at(run_dir)
    rows = run.read_metrics()
    pick = {"first": metrics.first, "last": metrics.last}
    return {
        "stage": stage,
        "final_step": metrics.last_step(rows, step_key),
        **{name: pick[how](rows, key) for name, (how, key) in fields.items()},
        "resumed_from": run.resumed_from(),
        "out_dir": str(Path(run_dir)),
        "metrics": str(Path(run_dir) / metrics.FILE),
    }
