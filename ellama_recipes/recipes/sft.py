"""Supervised fine-tuning (SFT) of the continued-pretrained Llama 3.1: the first stage of ``ellama align``.

Full-parameter fine-tuning through ``nemo.collections.llm.finetune`` (:mod:`ellama_recipes.engine.sft`) on chat
data templated and loss-masked by :mod:`ellama_recipes.data.chat` (loss on assistant tokens only). CLI::

    ellama align --size 8b --from runs/cpt --sft data/sft --dpo data/pref --out runs/aligned --dryrun
    ellama align --size tiny --from runs/cpt --sft ellama_recipes/sample_data/sft \
        --dpo ellama_recipes/sample_data/preference --out runs/aligned --sft-steps 30 --dpo-steps 20

Real-size defaults (tuned for H100 80GB SXM, 8 GPUs per node; the layouts are the continued-pretraining ones of
:mod:`ellama_recipes.model.sizes` at half the sequence length):

- Tulu 3 SFT (Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language Model Post-Training", table of SFT
  hyper-parameters): peak LR 5e-6 for 8B, 2e-6 for 70B (and its 405B run), 2 epochs, effective batch 128,
  max sequence length 4096, warmup ratio 0.03, then decay to 0 (Tulu: linear; here the engine's cosine), no weight
  decay. The Llama 3 paper (Dubey et al. 2024, section 4.1.3) fine-tunes with LR 1e-5 for 8.5k-9k steps; Tulu's
  values are the published per-size ones, so they are the defaults.
- ``train_steps`` defaults to ``epochs x train rows / global batch`` of the prepared data (``ellama align``
  computes it; ``--sft-steps`` overrides); ``data.epochs`` = 2.
- Layout (:func:`sft_layout`): the size row's parallelism on the most nodes (up to the row's) whose data-parallel
  size fits a batch of 128: 8b 8 nodes (DP32); 70b 32 nodes (TP4 PP4 VPP5 CP2 -> DP8; 60 nodes give DP15, which
  does not divide 128). 405b: no node count fits 128 with PP18 x VPP7 (the interleaved schedule needs the micro
  batches per DP rank to be a multiple of PP), so 144 nodes (DP4) and a global batch of 144.
- LR by model size (> 20B parameters: the 70B value); all of it derived from the size row, so a new row needs no
  SFT code.
- CPU smoke sizes (``cpu_fallback`` rows, i.e. tiny): LR 3e-4, the row's batch and sequence length. The quickstart's
  tiny base is trained on general text, so 1e-3 (chosen for the old random-init stand-in) wrecked it: SFT (87 steps)
  then DPO (20 steps) on its CPT model took the general perplexity from 3.6 to 95 at SFT/DPO LR 1e-3/1e-3, to 23 at
  3e-4/3e-5, 15 at 2e-4/3e-5, 7.5 at 1e-4/3e-5 (the DPO LR barely matters: 3e-4/1e-4 also 23). 3e-4 is the lowest
  that still moves a random-init tiny model clearly in 24 steps (tests/test_sft.py wants a 0.5 drop: 1e-4 gave
  0.37, 2e-4 0.52).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellama_recipes.config.build import apply_flags, finish, from_size
from ellama_recipes.config.schema import PeakSchedule, TrainConfig
from ellama_recipes.recipes import Recipe, check_checkpoint_dir, register
from ellama_recipes.model.sizes import Size, get_size

DATA_PLACEHOLDER = "<unset: `ellama align` prepares RUN2/sft/data/{train,validation}.jsonl from --sft>"

# Tulu 3 SFT (Lambert et al. 2024): peak LR 5e-6 for 8B, 2e-6 for 70B (and 405B); effective batch 128; 2 epochs;
# max sequence 4096; warmup ratio 0.03.
TULU3_LR_SMALL, TULU3_LR_LARGE = 5e-6, 2e-6
TULU3_LARGE_FROM_PARAMS = 20e9  # models above this use the 70B LR
TULU3_GLOBAL_BATCH = 128
TULU3_SEQ_LENGTH = 4096
EPOCHS = 2
WARMUP_RATIO = 0.03
# The CPU smoke sizes (size row cpu_fallback): 3e-4 keeps far more of the trained tiny base's general ability than
# 1e-3 did, and still moves a random-init one (measurements in the module docstring); batch and sequence as in its
# pretraining row.
SMOKE = dict(lr=3e-4, warmup_steps=3, train_steps=30)


def sft_layout(sz: Size, global_batch: int, micro_batch: int) -> tuple[int, int]:
    """``(num_nodes, global_batch_size)`` for SFT on the size row's parallelism.

    The most nodes (up to the row's) whose data-parallel size divides ``global_batch`` (and, with an interleaved
    pipeline, leaves a whole number of micro batches per pipeline stage). When no node count gives exactly
    ``global_batch`` (405b: PP18 x VPP7), the row's node count with the batch rounded up to the next multiple.
    """
    p = sz.parallelism
    mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    step_of = lambda dp: micro_batch * dp * (p.pipeline_parallel if p.virtual_pipeline_parallel else 1)  # noqa: E731
    fits = [n for n in range(sz.num_nodes, 0, -1) if (n * sz.gpus_per_node) % mp == 0]
    for n in fits:
        if global_batch % step_of(n * sz.gpus_per_node // mp) == 0:
            return n, global_batch
    n = fits[0] if fits else sz.num_nodes
    step = step_of(max(n * sz.gpus_per_node // mp, 1))
    return n, math.ceil(global_batch / step) * step


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
    """SFT: the shared :class:`TrainConfig` plus ``data`` (:class:`SFTDataSpec`); ``schedule.max_lr`` is the SFT peak
    LR itself (Tulu 3's), not a fraction of pretraining's."""

    stage = "sft"
    title = "SFT"
    run_name = "sft"

    schedule: PeakSchedule
    data: SFTDataSpec = field(default_factory=SFTDataSpec)
    lr_source: str = ""

    def stage_problems(self, *, at_launch: bool = False) -> list[str]:
        out = []
        d = self.data
        if not 0 < d.val_fraction < 1:
            out.append(f"data.val_fraction={d.val_fraction} must be in (0, 1).")
        if d.epochs <= 0:
            out.append(f"data.epochs={d.epochs} must be > 0.")
        # (interleaved pipeline: micro batches per step % PP is a TrainConfig rule, shared by every stage)
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

    ``flags``: the shared ones of :func:`ellama_recipes.config.build.apply_flags` (num_nodes, gpus_per_node, fp8,
    executor, restore_from, out_dir, train_steps, save_every ...).
    """
    sz = get_size(size)
    if sz.cpu_fallback:  # a CPU smoke size: its own batch and sequence, a large LR, few steps
        lr, lr_source = SMOKE["lr"], "CPU smoke size (tiny trained base)"
        nodes, gbs, mbs, seq = sz.num_nodes, sz.global_batch_size, sz.micro_batch_size, sz.seq_length
        steps, warmup = SMOKE["train_steps"], SMOKE["warmup_steps"]
    else:
        large = sz.arch.num_parameters() > TULU3_LARGE_FROM_PARAMS
        lr = TULU3_LR_LARGE if large else TULU3_LR_SMALL
        lr_source = f"Tulu 3 SFT ({'70B/405B' if large else '8B'}: {lr:g})"
        mbs, seq = 1, TULU3_SEQ_LENGTH
        nodes, gbs = sft_layout(sz, TULU3_GLOBAL_BATCH, mbs)
        steps = 1000  # replaced by data.epochs x rows / global batch once the data is prepared (ellama align)
        warmup = max(1, round(WARMUP_RATIO * steps))
    cfg = from_size(
        SFTConfig,
        sz,
        PeakSchedule(
            max_lr=lr,
            min_lr_ratio=0.0,
            warmup_steps=warmup,
            train_steps=steps,
            global_batch_size=gbs,
            micro_batch_size=mbs,
            seq_length=seq,
            val_check_interval=sz.val_check_interval,
            limit_val_batches=max(1, sz.limit_val_batches // 4),
        ),
        data=SFTDataSpec(num_workers=sz.num_workers),
        lr_source=lr_source,
    )
    cfg.optimizer.weight_decay = 0.0  # Tulu 3 SFT
    cfg.cluster.num_nodes = nodes
    cfg.checkpoint.out_dir = "runs/aligned/sft"
    apply_flags(cfg, **flags)
    if flags.get("train_steps") is not None:  # the warmup follows the step count
        set_train_steps(cfg, flags["train_steps"])
    if train is not None:
        cfg.data.train = str(train)
    if validation is not None:
        cfg.data.validation = str(validation)
    if pad_id is not None:
        cfg.data.pad_id = int(pad_id)
    return finish(cfg, overrides)


def steps_for(cfg: SFTConfig, train_rows: int) -> int:
    """``data.epochs`` passes over ``train_rows`` at the configured global batch (at least 1 step)."""
    return max(1, math.ceil(cfg.data.epochs * train_rows / cfg.schedule.global_batch_size))


def set_train_steps(cfg: SFTConfig, steps: int) -> None:
    """Set the step count and the warmup that goes with it (3% of the steps, Tulu 3)."""
    cfg.schedule.train_steps = steps
    if cfg.cluster.cpu_fallback:
        cfg.schedule.warmup_steps = min(SMOKE["warmup_steps"], max(steps - 1, 0))
    else:
        cfg.schedule.warmup_steps = max(1, min(round(WARMUP_RATIO * steps), steps - 1)) if steps > 1 else 0


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

    return build_sft_partial(cfg, report=RECIPE.report())


# What `ellama align` shows for SFT and RUN2/sft/complete.json records (read off RUN2/sft/metrics.jsonl).
SUMMARY = {"step_key": "loss", "fields": {"first_loss": ("first", "loss"), "final_loss": ("last", "loss"),
                                          "first_val_loss": ("first", "val_loss"),
                                          "final_val_loss": ("last", "val_loss")}}


RECIPE = register(
    Recipe(
        name="sft",
        config_cls=SFTConfig,
        build_config=build_config,
        build_partial=build_partial,
        check_inputs=check_inputs,
        summary=SUMMARY,
        description="supervised fine-tuning on chat data, loss on assistant tokens (Tulu 3 defaults)",
    )
)
