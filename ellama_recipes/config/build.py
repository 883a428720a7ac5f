"""Building a stage config: what the size row says, the CLI flags every stage shares, the ``--from`` architecture.

A stage recipe's ``build_config`` (:mod:`ellama_recipes.recipes`) is: :func:`from_size` (the size row's
architecture, parallelism, cluster, precision and checkpoint cadence, plus the stage's schedule and specs), its own
defaults, :func:`apply_flags`, then :func:`finish` (the ``key=value`` overrides, then the ``--from`` checkpoint's
architecture). Precedence, lowest to highest: size row < recipe defaults < flags < overrides.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from ellama_recipes.config.overrides import apply_overrides
from ellama_recipes.config.schema import CheckpointSpec, ClusterSpec, ModelConfig, OptimizerSpec, PrecisionSpec
from ellama_recipes.errors import UserError
from ellama_recipes.model import architecture
from ellama_recipes.model.sizes import Size


def schedule_from(sz: Size, schedule_cls: type, **values: Any) -> Any:
    """``schedule_cls`` with every field the size row also has (batch, sequence, steps, warmup, validation cadence,
    the base model's max LR) taken from the row, then ``values``."""
    row = {f.name: getattr(sz, f.name) for f in dataclasses.fields(schedule_cls) if hasattr(sz, f.name)}
    return schedule_cls(**{**row, **values})


def from_size(cls: type, sz: Size, schedule: Any, **stage_fields: Any) -> Any:
    """A stage config (``cls``, a TrainConfig subclass) with everything the size row says, and ``schedule``."""
    return cls(
        size=sz.name,
        model=ModelConfig(**dataclasses.asdict(sz.arch), attention_backend=sz.attention_backend),
        schedule=schedule,
        optimizer=OptimizerSpec(distributed_optimizer=sz.distributed_optimizer),
        parallel=copy.deepcopy(sz.parallelism),
        cluster=ClusterSpec(num_nodes=sz.num_nodes, gpus_per_node=sz.gpus_per_node, cpu_fallback=sz.cpu_fallback),
        precision=PrecisionSpec(mode=sz.precision),  # type: ignore[arg-type]
        checkpoint=CheckpointSpec(save_every=sz.save_every, log_every=sz.log_every),
        **stage_fields,
    )


def apply_flags(
    cfg: Any,
    *,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    fp8: bool = False,
    fp8_recipe: str | None = None,
    executor: str | None = None,
    restore_from: str | None = None,
    from_scratch: bool = False,
    out_dir: str | None = None,
    train_steps: int | None = None,
    save_every: int | None = None,
) -> Any:
    """The CLI flags every training stage shares, applied in place (after the recipe defaults)."""
    if num_nodes is not None:
        cfg.cluster.num_nodes = num_nodes
    if gpus_per_node is not None:
        cfg.cluster.gpus_per_node = gpus_per_node
    if fp8:
        cfg.precision.mode = "fp8"
    if fp8_recipe is not None:
        cfg.precision.fp8_recipe = fp8_recipe  # type: ignore[assignment]
    if executor is not None:
        cfg.cluster.executor = executor  # type: ignore[assignment]
    if restore_from is not None:
        cfg.checkpoint.restore_from = str(restore_from)
    if from_scratch:
        cfg.checkpoint.from_scratch = True
    if out_dir is not None:
        cfg.checkpoint.out_dir = str(out_dir)
    if train_steps is not None:
        cfg.schedule.train_steps = train_steps
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(train_steps // 10, 0))
    if save_every is not None:
        cfg.checkpoint.save_every = save_every
    return cfg


def finish(cfg: Any, overrides: list[str] | None) -> Any:
    """Apply the dotted overrides, then take the architecture from the `--from` checkpoint (not validated).

    The model really trained is the `--from` checkpoint's (any Llama-3.1 architecture); ``--size`` only picks the
    recipe defaults. An architecture override (``model.num_layers=...``) together with ``--from`` would be shown by
    the dry run and then replaced by the checkpoint's architecture in training, so it is refused (exit 2).
    """
    overrides = list(overrides or [])
    if cfg.checkpoint.restore_from:
        arch = [o for o in overrides if o.split("=", 1)[0].strip() in {f"model.{k}" for k in architecture.NAMES}]
        if arch:
            raise UserError(
                f"{', '.join(arch)}: the model architecture comes from the --from checkpoint "
                f"({cfg.checkpoint.restore_from}), so model.* architecture overrides cannot apply to it. Fix: drop "
                "them, or build a checkpoint with that architecture (`ellama import-hf`) and pass it with --from."
            )
    apply_overrides(cfg, overrides)
    if cfg.checkpoint.restore_from:
        for key, value in (architecture.from_checkpoint(cfg.checkpoint.restore_from) or {}).items():
            setattr(cfg.model, key, value)
    return cfg
