"""Training callbacks that travel inside the recipe's partial (so GPU launches get them too)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ellama_recipes.io import metrics
from ellama_recipes.io.run_folder import RunFolder


class MetricsJsonl(pl.Callback):
    """Append one JSON object per logged step to ``RUN/metrics.jsonl``.

    Keys: ``step`` (optimizer steps completed, 1-based), ``train_loss``, ``lr``, ``step_time_s`` (NeMo's
    TimingCallback), and ``val_loss_domain`` / ``val_loss_general`` on steps where validation ran. On resume the file is appended to; lines for steps at or after the resumed step (written
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
        step = int(trainer.global_step)
        resumed = bool(trainer.ckpt_path) and step > 0
        if resumed:
            print(f"[ellama] resumed from step {step} ({trainer.ckpt_path})", flush=True)
        if resumed:
            _fix_restored_batch_progress(trainer)
        # Records after the resumed step came from the killed run past its last complete checkpoint.
        metrics.truncate_after(self.path, step)
        RunFolder.at(self.path.parent).write_resumed(step if resumed else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.max_steps and step >= trainer.max_steps:
            # Validate after the final step in resumed runs too. Lightning validates at the end only when its
            # data fetcher reports the last batch (lightning/pytorch/loops/training_epoch_loop.py
            # _should_check_val_fx); after a resume the fetcher counts from 0 against the full sampler length
            # and never gets there. Runs on every rank (validation is collective).
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = True
        if trainer.global_rank != 0:
            return
        if step % self.log_every and step != trainer.max_steps:
            return
        logged = trainer.callback_metrics
        loss = logged.get("reduced_train_loss")
        lr = logged.get("lr")
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        rec = {"step": int(step), "train_loss": to_float(loss), "lr": to_float(lr)}
        step_time = logged.get("train_step_timing in s")
        if step_time is not None:
            rec["step_time_s"] = to_float(step_time)
        metrics.append(self.path, rec)

    # ---------------------------------------------------------------- per-source validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val: dict[str, list[float]] = {"domain": [], "general": []}
        self._val_batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if getattr(trainer, "sanity_checking", False) or outputs is None:
            return
        per_side = getattr(trainer.datamodule, "val_batches_per_side", None) if trainer.datamodule else None
        if not per_side:
            return
        # batch_idx counts fetched micro batches under NeMo's dataloader_iter steps; count global batches here.
        side = "domain" if self._val_batches < per_side else "general"
        self._val_batches += 1
        value = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._val[side].append(float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(trainer, "sanity_checking", False) or not hasattr(self, "_val"):
            return
        # Only the last pipeline stage computes the loss (others return 0): sum the per-side totals over the
        # pipeline group so global rank 0 (first stage) sees the real values.
        sums = torch.tensor(
            [sum(self._val["domain"]), len(self._val["domain"]), sum(self._val["general"]), len(self._val["general"])],
            dtype=torch.float64,
        )
        pp_group = pipeline_group()
        if pp_group is not None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else sums.device
            sums = sums.to(dev)
            torch.distributed.all_reduce(sums, group=pp_group)
            sums = sums.cpu()
            n_stages = torch.distributed.get_world_size(pp_group)
            sums[1] /= n_stages
            sums[3] /= n_stages
        vals = {}
        if sums[1] > 0:
            vals["val_loss_domain"] = float(sums[0] / sums[1])
        if sums[3] > 0:
            vals["val_loss_general"] = float(sums[2] / sums[3])
        if vals:
            pl_module.log_dict(vals, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if trainer.global_rank != 0 or not vals:
            return
        step = int(trainer.global_step)
        metrics.merge_step(self.path, step, vals)
        shown = "  ".join(f"{k}={v:.4f}" for k, v in vals.items())
        print(f"[ellama] step {step}: {shown}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        # The forgetting curve (val_loss_domain / val_loss_general vs step) next to metrics.jsonl: RUN/forgetting.png.
        if trainer.global_rank != 0:
            return
        from ellama_recipes.io.charts import ChartError, forgetting_curve

        try:
            png = forgetting_curve(self.path)
        except ChartError as exc:
            print(f"[ellama] no forgetting curve: {exc}", flush=True)
            return
        print(f"[ellama] forgetting curve -> {png}", flush=True)


def _fix_restored_batch_progress(trainer) -> None:
    """Make Lightning's restored batch counters agree with the restored global step.

    NeMo's ModelCheckpoint saves from ``on_train_batch_end``, i.e. before Lightning marks the batch completed,
    so the restored ``batch_progress`` has ``completed = ready - 1``; on restart Lightning resets ``ready`` to
    ``completed`` (lightning/pytorch/loops/progress.py ``_ReadyCompletedTracker.reset_on_restart``) and every
    later ``batch_idx`` is one behind. Validation is scheduled on ``(batch_idx + 1) % val_check_interval``
    (lightning/pytorch/loops/training_epoch_loop.py ``_should_check_val_fx``), so a resumed run would validate
    at different steps than an uninterrupted one. Counting the saved batch as completed fixes that.
    """
    bp = trainer.fit_loop.epoch_loop.batch_progress
    step = int(trainer.global_step)
    for tracker in (bp.total, bp.current):
        if tracker.ready == step and tracker.completed == step - 1:
            tracker.completed = step


def pipeline_group():
    """The pipeline-parallel group when PP > 1 (None otherwise): only its last stage computes the loss."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() <= 1:
        return None
    return parallel_state.get_pipeline_model_parallel_group()


def to_float(x: Any) -> float | None:
    """A logged value (tensor or number) as a finite float, or None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().float().item()
    x = float(x)
    return x if math.isfinite(x) else None


def _step_checkpoint_class():
    from nemo.lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint

    class StepCheckpoint(ModelCheckpoint):
        """NeMo's ``ModelCheckpoint`` with ``{step}`` = optimizer steps completed, the ``step`` of metrics.jsonl.

        Upstream fills ``{step}`` from the ``step`` metric NeMo logs inside ``training_step``, i.e. before that
        step's optimizer update: the checkpoint saved after 20 steps was named ``step=19`` while metrics.jsonl
        called it step 20. Here the name uses ``trainer.global_step`` at save time (20).
        """

        def _monitor_candidates(self, trainer):
            candidates = super()._monitor_candidates(trainer)
            candidates["step"] = torch.tensor(int(trainer.global_step))
            return candidates

    StepCheckpoint.__module__ = __name__
    StepCheckpoint.__qualname__ = "StepCheckpoint"
    return StepCheckpoint


def __getattr__(name: str) -> Any:
    # StepCheckpoint subclasses a NeMo class: built on first use so importing this module stays light.
    if name == "StepCheckpoint":
        cls = _step_checkpoint_class()
        globals()["StepCheckpoint"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
