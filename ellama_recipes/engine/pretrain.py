"""Continued pretraining on the engine: the ``run.Partial`` of ``llm.pretrain`` and its entry function.

What :func:`build_pretrain_partial` holds (e-Llama continued pretraining, see DESIGN.md), from the shared blocks of
:mod:`ellama_recipes.engine.blocks` plus pretraining's own parts:

- data: :class:`ellama_recipes.engine.pretrain_data.ManifestDataModule`, a ``llm.PreTrainingDataModule`` that reads
  the blend from ``manifest.json`` at run time and adds per-source (domain / general) validation;
- metrics: :class:`ellama_recipes.engine.callbacks.MetricsJsonl` (``train_loss``, ``lr``, ``val_loss_domain`` /
  ``val_loss_general``) and the forgetting curve ``RUN/forgetting.png`` at the end;
- validation: ``schedule.limit_val_batches`` global batches of domain text, then as many of general text; the loader
  holds exactly those, so the trainer runs all of it (``limit_val_batches=1.0``; an integer would count the micro
  batches NeMo's megatron step fetches, not global batches).

Example (what ``ellama pretrain --size 70b --dryrun`` does)::

    from ellama_recipes.recipes.pretrain import build_config
    partial = get_recipe("pretrain").build_partial(build_config("70b"))
"""

from __future__ import annotations

import nemo_run as run

from ellama_recipes.config.schema import TrainConfig
from ellama_recipes.data.manifest import MANIFEST_PLACEHOLDER
from ellama_recipes.engine import blocks
from ellama_recipes.io.run_folder import RunFolder


def data_module(cfg: TrainConfig) -> run.Config:
    from ellama_recipes.engine.pretrain_data import ManifestDataModule

    s, d = cfg.schedule, cfg.data
    manifest = d.manifest if d.manifest and d.manifest != MANIFEST_PLACEHOLDER else None
    return run.Config(
        ManifestDataModule,
        manifest=str(blocks.abs_path(manifest)) if manifest else MANIFEST_PLACEHOLDER,
        seq_length=s.seq_length,
        micro_batch_size=s.micro_batch_size,
        global_batch_size=s.global_batch_size,
        num_workers=d.num_workers,
        seed=d.seed,
        split=d.split,
        val_batches_per_side=s.limit_val_batches,
        tokenizer_from=str(blocks.abs_path(cfg.checkpoint.restore_from)) if cfg.checkpoint.restore_from else None,
        vocab_size=cfg.model.vocab_size,
    )


def trainer(cfg: TrainConfig) -> run.Config:
    from ellama_recipes.engine.callbacks import MetricsJsonl

    metrics = run.Config(MetricsJsonl, path=str(RunFolder.of(cfg).metrics), log_every=cfg.checkpoint.log_every)
    return blocks.trainer(cfg, metrics=metrics, limit_val_batches=1.0)


def pretrain(model, data, trainer, log, optim, resume, run_dir: str | None = None, report: dict | None = None):
    """The continued-pretraining entry function of every rank: per-rank setup, ``llm.pretrain``, then
    ``RUN/complete.json`` on rank 0 when all steps are done."""
    from nemo.collections import llm

    from ellama_recipes.engine.runner import finish_stage, prepare_rank

    prepare_rank(run_dir)
    result = llm.pretrain(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume)
    finish_stage(trainer, run_dir, report)
    return result


def build_pretrain_partial(cfg: TrainConfig, *, report: dict | None = None) -> run.Partial:
    """The continued-pretraining ``run.Partial`` for ``cfg`` (not validated here): :func:`pretrain` with the model,
    data, trainer, logger (checkpoints ``RUN/checkpoints/<cfg.run_name>--step=...``), optimizer and resume blocks. The
    in-process run, every torchrun rank and every Slurm task run the same thing. ``report``: the recipe's summary
    spec for ``RUN/complete.json``."""
    from nemo.collections import llm

    return blocks.stage_partial(pretrain, cfg, model=run.Config(llm.LlamaModel, config=blocks.model_config(cfg)),
                                data=data_module(cfg), trainer=trainer(cfg), report=report)


__all__ = ["build_pretrain_partial", "data_module", "pretrain", "trainer"]
