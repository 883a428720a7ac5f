"""Continued pretraining of Llama 3.1 (e-Llama recipe), one shared base for every size.

Tuned for: H100 80GB SXM nodes, 8 GPUs per node with NVLink, InfiniBand between nodes (see sizes.py for the per-size
parallelism and its memory justification). CLI:

    ellama pretrain --size 70b --nodes 60 --dryrun
    ellama pretrain --size 8b --fp8 --executor slurm cluster.slurm_account=... --dryrun
    ellama pretrain --size tiny --from checkpoints/tiny --data data/manifest.json --out runs/cpt

The recipe: max LR = 10% of the base model's max LR, linear warmup then cosine decay to 10% of it, everything else
from the size row. ``build_partial(cfg)`` returns the ``nemo_run.Partial`` of
:func:`ellama_recipes.engine.runner.pretrain` (``llm.pretrain`` in every rank); the engine owns every NeMo object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellama_recipes.config.build import apply_flags, finish, from_size, schedule_from
from ellama_recipes.config.schema import CPTSchedule, TrainConfig
from ellama_recipes.data.manifest import MANIFEST_PLACEHOLDER
from ellama_recipes.recipes import Recipe, check_checkpoint_dir, register
from ellama_recipes.model.sizes import get_size

LR_FRACTION = 0.10  # e-Llama: 10% of the base model's max LR
MIN_LR_RATIO = 0.10


@dataclass
class DataSpec:
    manifest: str | None = None  # path to manifest.json from `ellama data build`
    split: str = "990,10,0"  # train, validation, test documents per 1000 (Megatron split string)
    num_workers: int = 2
    seed: int = 1234


@dataclass
class PretrainConfig(TrainConfig):
    """Continued pretraining: the shared :class:`TrainConfig` with e-Llama's schedule (:class:`CPTSchedule`: peak LR =
    ``schedule.lr_fraction`` x the base model's max LR) plus the data blend (``data``)."""

    stage = "pretrain"
    title = "pretraining"
    run_name = "cpt"

    schedule: CPTSchedule
    data: DataSpec = field(default_factory=DataSpec)

    def stage_problems(self, *, at_launch: bool = False) -> list[str]:
        if at_launch and self.data.manifest in (None, "", MANIFEST_PLACEHOLDER):
            return [
                "data.manifest is not set. Fix: run `ellama data build ... --out DIR` and pass "
                "--data DIR/manifest.json."
            ]
        return []

    def stage_summary(self) -> dict[str, Any]:
        return {"data_manifest": self.data.manifest or MANIFEST_PLACEHOLDER}


def build_config(
    size: str,
    *,
    manifest: str | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> PretrainConfig:
    """The continued-pretraining recipe for ``size`` with flags, then dotted overrides, applied (not validated).

    ``flags``: the shared ones of :func:`ellama_recipes.config.build.apply_flags` (num_nodes, gpus_per_node, fp8,
    fp8_recipe, executor, restore_from, from_scratch, out_dir, train_steps, save_every).
    """
    sz = get_size(size)
    cfg = from_size(
        PretrainConfig,
        sz,
        schedule_from(sz, CPTSchedule, lr_fraction=LR_FRACTION, min_lr_ratio=MIN_LR_RATIO),
        data=DataSpec(num_workers=sz.num_workers),
    )
    cfg.checkpoint.out_dir = "runs/cpt"
    apply_flags(cfg, **flags)
    if manifest is not None:
        cfg.data.manifest = str(manifest)
    return finish(cfg, overrides)


def check_inputs(cfg: PretrainConfig) -> list[str]:
    """`--data` and `--from` exist (plain file checks, no NeMo import)."""
    problems = []
    if cfg.data.manifest and cfg.data.manifest != MANIFEST_PLACEHOLDER and not Path(cfg.data.manifest).is_file():
        problems.append(f"--data {cfg.data.manifest}: no such file. Build it with `ellama data build ... --out DIR`.")
    problems += check_checkpoint_dir(cfg.checkpoint.restore_from, size=cfg.size)
    return problems


def build_partial(cfg: PretrainConfig) -> Any:
    from ellama_recipes.engine.pretrain import build_pretrain_partial

    return build_pretrain_partial(cfg, report=RECIPE.report())


# What `ellama pretrain` prints and RUN/complete.json records (read off RUN/metrics.jsonl).
SUMMARY = {"step_key": "train_loss", "fields": {"final_train_loss": ("last", "train_loss"),
                                                "val_loss_domain": ("last", "val_loss_domain"),
                                                "val_loss_general": ("last", "val_loss_general")}}


RECIPE = register(
    Recipe(
        name="pretrain",
        config_cls=PretrainConfig,
        build_config=build_config,
        build_partial=build_partial,
        check_inputs=check_inputs,
        summary=SUMMARY,
        description="continued pretraining on a data blend (e-Llama)",
    )
)
