"""Training callbacks that travel inside the recipe's partial (so GPU launches get them too)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class MetricsJsonl(pl.Callback):
    """Append one JSON object per logged step to ``RUN/metrics.jsonl``.

    Keys: ``step``, ``train_loss``, ``lr``, and ``val_loss_domain`` / ``val_loss_general`` on steps where
    validation ran. On resume the file is appended to; lines for steps at or after the resumed step (written
    by the killed run after its last complete checkpoint) are dropped first, so no step appears twice.
    """

    def __init__(self, path: str, log_every: int = 1) -> None:
        self.path = Path(path)
        self.log_every = max(int(log_every), 1)
        self._pending: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        step = trainer.global_step
        if step % self.log_every and step != trainer.max_steps:
            return
        metrics = trainer.callback_metrics
        loss = metrics.get("reduced_train_loss")
        lr = metrics.get("lr")
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        rec = {"step": int(step), "train_loss": _num(loss), "lr": _num(lr)}
        _append(self.path, rec)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().float().item()
    x = float(x)
    return x if math.isfinite(x) else None


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_after(path: Path, step: int) -> None:
    """Drop records with ``step > step`` (and any torn last line); rewrite atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", -1)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)
