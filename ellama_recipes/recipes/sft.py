"""Supervised fine-tuning (SFT) of the continued-pretrained Llama 3.1: the first stage of ``ellama align``.

Full-parameter fine-tuning through ``nemo.collections.llm.finetune`` (:mod:`ellama_recipes.engine.sft`) on chat
data templated and loss-masked by :mod:`ellama_recipes.data.chat` (loss on assistant tokens only). CLI::

    ellama align --size 8b --from runs/cpt --sft data/sft --dpo data/pref --out runs/aligned --dryrun
    ellama align --size tiny --from runs/cpt --sft ellama_recipes/sample_data/sft \
        --dpo ellama_recipes/sample_data/preference --out runs/aligned --sft-steps 30 --dpo-steps 20

Real-size defaults (tuned for H100 80GB SXM, 8 GPUs per node; the layouts are the continued-pretraining ones of
:mod:`ellama_recipes.sizes` at half the sequence length):

- Tulu 3 SFT (Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language Model Post-Training", table of SFT
  hyper-parameters): peak LR 5e-6 for 8B, 2e-6 for 70B (and its 405B run), 2 epochs, effective batch 128,
  max sequence length 4096, warmup ratio 0.03, then decay to 0 (Tulu: linear; here the engine's cosine), no weight
  decay. The Llama 3 paper (Dubey et al. 2024, section 4.1.3) fine-tunes with LR 1e-5 for 8.5k-9k steps; Tulu's
  values are the published per-size ones, so they are the defaults.
- ``train_steps`` defaults to ``epochs x train rows / global batch`` of the prepared data (``ellama align``
  computes it; ``--sft-steps`` overrides); ``data.epochs`` = 2.
- 70b: 8 nodes (64 GPUs, TP4 PP4 VPP5 CP2 -> DP2): the CPT layout on fewer nodes, since a batch of 128 needs
  ``128 % DP == 0`` (60 nodes give DP15). 405b: global batch 144 (not 128): with PP18 x VPP7 the interleaved
  schedule needs the micro batches per DP rank (144 / DP4 = 36) to be a multiple of PP=18.
- tiny: the CPU smoke size; LR 1e-3 (the randomly initialised tiny stand-in needs a large LR to move in 30 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellama_recipes.recipe import ScheduleSpec, TrainConfig, apply_flags, base_config, finish_config
from ellama_recipes.recipes import Recipe, check_checkpoint_dir, register
from ellama_recipes.sizes import get_size

DATA_PLACEHOLDER = "<unset: `ellama align` prepares RUN2/sft/data/{train,validation}.jsonl from --sft>"

# size -> (peak LR, citation), (global batch, micro batch, seq length), num_nodes (None: the size row's)
SFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"lr": 1e-3, "lr_source": "tiny CPU smoke size (random-init stand-in)", "gbs": 8, "mbs": 2,
             "seq": 256, "nodes": None, "warmup": 3, "steps": 30},
    "8b": {"lr": 5e-6, "lr_source": "Tulu 3 SFT, 8B", "gbs": 128, "mbs": 1, "seq": 4096, "nodes": None},
    "70b": {"lr": 2e-6, "lr_source": "Tulu 3 SFT, 70B", "gbs": 128, "mbs": 1, "seq": 4096, "nodes": 8},
    "405b": {"lr": 2e-6, "lr_source": "Tulu 3 SFT, 70B/405B", "gbs": 144, "mbs": 1, "seq": 4096, "nodes": None},
}
EPOCHS = 2  # Tulu 3
WARMUP_RATIO = 0.03  # Tulu 3


@dataclass
class SFTDataSpec:
    """The prepared (tokenized, loss-masked) rows; ``ellama align`` writes them from ``--sft``."""

    train: str | None = None  # RUN2/sft/data/train.jsonl
    validation: str | None = None  # RUN2/sft/data/validation.jsonl
    pad_id: int = 0  # the tokenizer's pad (else eos) id; loss mask 0 on padding
    epochs: float = EPOCHS  # sets schedule.train_steps from the prepared row count when --sft-steps is not given
    val_fraction: float = 0.05  # held-out share of the --sft rows (at least one row)
    seed: int = 1234
    num_workers: int = 2


@dataclass
class SFTConfig(TrainConfig):
    """SFT: the shared :class:`TrainConfig` plus ``data`` (:class:`SFTDataSpec`). ``schedule.base_max_lr`` is the
    SFT peak LR itself (``schedule.lr_fraction`` = 1), not a fraction of pretraining's."""

    stage = "sft"
    title = "SFT"

    data: SFTDataSpec = field(default_factory=SFTDataSpec)
    lr_source: str = ""

    def stage_problems(self, *, at_launch: bool = False) -> list[str]:
        out = []
        d, s, p = self.data, self.schedule, self.parallel
        if not 0 < d.val_fraction < 1:
            out.append(f"data.val_fraction={d.val_fraction} must be in (0, 1).")
        if d.epochs <= 0:
            out.append(f"data.epochs={d.epochs} must be > 0.")
        dp = self.data_parallel
        if p.virtual_pipeline_parallel and dp and s.global_batch_size % (s.micro_batch_size * dp) == 0:
            micro = s.global_batch_size // (s.micro_batch_size * dp)
            if micro % p.pipeline_parallel:
                out.append(
                    f"the interleaved pipeline (parallel.virtual_pipeline_parallel={p.virtual_pipeline_parallel}) needs "
                    f"micro batches per step ({micro} = global batch / (micro batch x DP)) to be a multiple of "
                    f"parallel.pipeline_parallel={p.pipeline_parallel}. Fix: set schedule.global_batch_size to a "
                    f"multiple of {s.micro_batch_size * dp * p.pipeline_parallel}, or parallel.virtual_pipeline_parallel=null."
                )
        if at_launch:
            for name in ("train", "validation"):
                path = getattr(d, name)
                if not path or path == DATA_PLACEHOLDER:
                    out.append(f"data.{name} is not set. Fix: run `ellama align` (it prepares the --sft data).")
        return out

    def stage_summary(self) -> dict[str, Any]:
        return {
            "lr_source": self.lr_source,
            "epochs": self.data.epochs,
            "data_train": self.data.train or DATA_PLACEHOLDER,
            "data_validation": self.data.validation or DATA_PLACEHOLDER,
        }


def build_config(
    size: str,
    *,
    train: str | None = None,
    validation: str | None = None,
    pad_id: int | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> SFTConfig:
    """The SFT recipe for ``size`` with flags, then dotted overrides, applied (not validated).

    ``flags``: the shared ones of :func:`ellama_recipes.recipe.apply_flags` (num_nodes, gpus_per_node, fp8,
    executor, restore_from, out_dir, train_steps, save_every ...).
    """
    sz = get_size(size)
    d = SFT_DEFAULTS[sz.name]
    steps = d.get("steps", 1000)
    cfg = base_config(
        SFTConfig,
        sz,
        ScheduleSpec(
            base_max_lr=d["lr"],
            lr_fraction=1.0,
            min_lr_ratio=0.0,
            warmup_steps=d.get("warmup", max(1, round(WARMUP_RATIO * steps))),
            train_steps=steps,
            global_batch_size=d["gbs"],
            micro_batch_size=d["mbs"],
            seq_length=d["seq"],
            val_check_interval=sz.val_check_interval,
            limit_val_batches=max(1, sz.limit_val_batches // 4),
        ),
        data=SFTDataSpec(num_workers=sz.num_workers),
        lr_source=d["lr_source"],
    )
    cfg.optimizer.weight_decay = 0.0  # Tulu 3 SFT
    if d["nodes"] is not None:
        cfg.cluster.num_nodes = d["nodes"]
    cfg.checkpoint.out_dir = "runs/aligned/sft"
    apply_flags(cfg, **flags)
    if flags.get("train_steps") is not None:  # warmup follows the step count (Tulu 3: 3%)
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(1, round(WARMUP_RATIO * flags["train_steps"])))
    if train is not None:
        cfg.data.train = str(train)
    if validation is not None:
        cfg.data.validation = str(validation)
    if pad_id is not None:
        cfg.data.pad_id = int(pad_id)
    return finish_config(cfg, overrides)


def steps_for(cfg: SFTConfig, train_rows: int) -> int:
    """``data.epochs`` passes over ``train_rows`` at the configured global batch (at least 1 step)."""
    return max(1, math.ceil(cfg.data.epochs * train_rows / cfg.schedule.global_batch_size))


def set_train_steps(cfg: SFTConfig, steps: int) -> None:
    """Set the step count and the warmup that goes with it (3% of the steps, Tulu 3)."""
    cfg.schedule.train_steps = steps
    cfg.schedule.warmup_steps = max(1, min(round(WARMUP_RATIO * steps), steps - 1)) if steps > 1 else 0
    if cfg.size == "tiny":
        cfg.schedule.warmup_steps = min(SFT_DEFAULTS["tiny"]["warmup"], max(steps - 1, 0))


def check_inputs(cfg: SFTConfig) -> list[str]:
    """`--from` is an engine checkpoint and the prepared data files exist (plain file checks)."""
    problems = check_checkpoint_dir(cfg.checkpoint.restore_from, size=cfg.size)
    for name in ("train", "validation"):
        path = getattr(cfg.data, name)
        if path and path != DATA_PLACEHOLDER and not Path(path).is_file():
            problems.append(f"data.{name} {path}: no such file. `ellama align` prepares it from --sft.")
    return problems


def build_partial(cfg: SFTConfig) -> Any:
    from ellama_recipes.engine.sft import build_sft_partial

    return build_sft_partial(cfg)


RECIPE = register(
    Recipe(
        name="sft",
        run_name="sft",
        config_cls=SFTConfig,
        build_config=build_config,
        build_partial=build_partial,
        check_inputs=check_inputs,
        description="supervised fine-tuning on chat data, loss on assistant tokens (Tulu 3 defaults)",
    )
)
