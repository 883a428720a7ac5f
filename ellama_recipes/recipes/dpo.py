"""DPO preference alignment after SFT, on the same engine as pretraining (a registered stage, ``"dpo"``).

    from ellama_recipes.recipes.dpo import build_config
    cfg = build_config("8b", restore_from="runs/al/sft/checkpoints/<last>", data_dir="runs/al/dpo/data",
                       out_dir="runs/al/dpo", overrides=["loss.beta=0.1"])
    # ellama align runs it; `get_recipe("dpo").build_partial(cfg)` is the NeMo-Run partial every rank runs

Defaults and their sources:

- ``loss.beta`` = 0.1 and ``loss.sft_loss_weight`` = 0.2 (an NLL term on the chosen responses), learning rate 1e-5:
  the Llama 3 paper (Dubey et al. 2024, section 4.1.4 "Direct Preference Optimization": "learning rate of 1e-5 and
  set the beta hyper-parameter to be 0.1", "an additional negative log-likelihood (NLL) loss term with a scaling
  coefficient of 0.2 on the chosen sequences"). beta 0.1 is also TRL's ``DPOConfig`` default.
- global batch 128 pairs, sequence 2048, 10% linear warmup: Tulu 3's DPO recipe (Lambert et al. 2024, table of DPO
  hyper-parameters: effective batch size 128, max sequence length 2048, warmup ratio 0.1); decay: cosine to 10%
  like every stage here. 2000 steps is about one epoch of a Tulu-3-sized preference mix (~270k pairs / 128).
- parallelism: the size row's TP / PP (and VPP), context parallel 1 (DPO sequences are short; the per-sequence
  log-prob sums are not split across CP ranks, see :mod:`ellama_recipes.engine.dpo`); nodes and batch from the same
  rule as SFT (:func:`ellama_recipes.recipes.sft.sft_layout` on the row with CP 1: the most nodes whose data-parallel
  size divides the batch; 405b's interleaved PP18 rounds the batch up to 144). Per-GPU memory stays below
  pretraining's: no reference model on the GPUs (its log-probs are precomputed), sequences of 2048 instead of 8192.
- tiny (CPU): LR 3e-5 (3x Llama 3's so a few CPU steps move the held-out margin; 1e-3, chosen when the tiny base was
  a random-init stand-in, wrecked the trained tiny base's general ability, see :mod:`ellama_recipes.recipes.sft`),
  batch 8 pairs (micro batch 2), 20 steps, validation every 5 steps on the held-out pairs, fp32.

The frozen reference is the ``--from`` checkpoint (the SFT result); its log-probs are precomputed once at step 0 by
the engine (why: :mod:`ellama_recipes.engine.dpo`). Run layout: ``RUN/checkpoints/dpo--step=...``,
``RUN/metrics.jsonl`` (``stage`` "dpo" rows), ``RUN/logs/``, ``RUN/reference_logps.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ellama_recipes.config.build import apply_flags, finish, from_size
from ellama_recipes.config.schema import PeakSchedule, TrainConfig
from ellama_recipes.recipes import Recipe, check_checkpoint_dir, register
from ellama_recipes.model.sizes import get_size

LLAMA3_DPO_LR = 1e-5  # Llama 3 paper, 4.1.4
LLAMA3_BETA = 0.1  # Llama 3 paper, 4.1.4 (also TRL's default)
LLAMA3_NLL_WEIGHT = 0.2  # Llama 3 paper, 4.1.4: NLL on the chosen sequences, scaled 0.2
TULU3_GLOBAL_BATCH = 128  # Tulu 3 DPO: effective batch size 128 (pairs)
TULU3_SEQ_LENGTH = 2048  # Tulu 3 DPO: max sequence length 2048
TRAIN_STEPS = 2000
MIN_LR_RATIO = 0.10

TINY = dict(lr=3e-5, global_batch_size=8, micro_batch_size=2, train_steps=20, warmup_steps=2,
            val_check_interval=5, save_every=10, seq_length=256)


@dataclass
class PairDataSpec:
    data_dir: str | None = None  # folder with train.jsonl / validation.jsonl (ellama_recipes.data.chat.prepare)
    val_fraction: float = 0.10  # held-out share of the --dpo pairs (the held-out reward accuracy needs more than a few)
    num_workers: int = 0
    seed: int = 1234  # order of the training pairs (a seeded permutation per epoch)


@dataclass
class DPOLossSpec:
    beta: float = LLAMA3_BETA
    sft_loss_weight: float = LLAMA3_NLL_WEIGHT  # 0 keeps pure DPO


@dataclass
class DPOConfig(TrainConfig):
    """DPO: the shared :class:`TrainConfig` plus the preference pairs (``data``) and the loss (``loss``)."""

    stage = "dpo"
    title = "DPO"
    run_name = "dpo"

    schedule: PeakSchedule
    data: PairDataSpec = field(default_factory=PairDataSpec)
    loss: DPOLossSpec = field(default_factory=DPOLossSpec)

    def stage_problems(self, *, at_launch: bool = False) -> list[str]:
        out = []
        if not (isinstance(self.loss.beta, (int, float)) and self.loss.beta > 0):
            out.append(f"loss.beta={self.loss.beta!r} must be > 0 (Llama 3: 0.1).")
        if not (isinstance(self.loss.sft_loss_weight, (int, float)) and self.loss.sft_loss_weight >= 0):
            out.append(f"loss.sft_loss_weight={self.loss.sft_loss_weight!r} must be >= 0 (0 = pure DPO).")
        if not 0 < self.data.val_fraction < 1:
            out.append(f"data.val_fraction={self.data.val_fraction} must be in (0, 1).")
        if self.parallel.context_parallel != 1:
            out.append(
                f"parallel.context_parallel={self.parallel.context_parallel}: DPO sums each response's log-probs "
                "over the whole sequence, which CP would split across ranks. Fix: parallel.context_parallel=1 (use TP "
                "/ PP for memory; DPO sequences are short)."
            )
        if at_launch:
            if self.checkpoint.from_scratch or not self.checkpoint.restore_from:
                out.append(
                    "DPO needs --from: the SFT checkpoint is both the starting policy and the frozen reference. "
                    "Fix: pass --from RUN2/sft (or its checkpoint)."
                )
            if not self.data.data_dir:
                out.append("data.data_dir is not set. Fix: point it at the prepared preference pairs (train.jsonl).")
        return out

    def stage_summary(self) -> dict[str, Any]:
        return {
            "beta": self.loss.beta,
            "sft_loss_weight": self.loss.sft_loss_weight,
            "reference": "the --from checkpoint; log-probs precomputed once at step 0 (RUN/reference_logps.pt)",
            "pairing": "chosen/rejected interleaved in one micro batch (Megatron micro batch = 2 x pairs)",
            "data_dir": self.data.data_dir,
            "val_batches": self.val_batches(),
        }

    def val_batches(self) -> int:
        """Held-out global batches per validation (all full batches of ``validation.jsonl``; 1 before it exists)."""
        f = Path(self.data.data_dir or "") / "validation.jsonl"
        if not self.data.data_dir or not f.is_file():
            return 1
        with open(f, encoding="utf-8") as fh:
            n = sum(1 for line in fh if line.strip())
        return max(1, n // max(self.schedule.global_batch_size, 1))


def build_config(
    size: str,
    *,
    data_dir: str | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> DPOConfig:
    """The DPO recipe for ``size`` with flags, then dotted overrides, applied (not validated).

    ``flags``: the shared ones of :func:`ellama_recipes.config.build.apply_flags` (num_nodes, gpus_per_node, executor,
    restore_from = the SFT checkpoint, out_dir, train_steps, save_every ...).
    """
    sz = get_size(size)
    tiny = sz.cpu_fallback
    lr = TINY["lr"] if tiny else LLAMA3_DPO_LR
    steps = TINY["train_steps"] if tiny else TRAIN_STEPS
    cfg = from_size(
        DPOConfig,
        sz,
        PeakSchedule(
            max_lr=lr,  # the DPO LR is absolute (Llama 3), not a fraction of the base model's
            min_lr_ratio=MIN_LR_RATIO,
            warmup_steps=TINY["warmup_steps"] if tiny else steps // 10,
            train_steps=steps,
            global_batch_size=TINY["global_batch_size"] if tiny else TULU3_GLOBAL_BATCH,
            micro_batch_size=TINY["micro_batch_size"] if tiny else 1,
            seq_length=TINY["seq_length"] if tiny else TULU3_SEQ_LENGTH,
            val_check_interval=TINY["val_check_interval"] if tiny else 200,
            limit_val_batches=1,
        ),
        data=PairDataSpec(num_workers=sz.num_workers),
    )
    cfg.parallel.context_parallel = 1
    if not tiny:
        from ellama_recipes.recipes.sft import sft_layout

        row = replace(sz, parallelism=replace(sz.parallelism, context_parallel=1))
        cfg.cluster.num_nodes, cfg.schedule.global_batch_size = sft_layout(row, TULU3_GLOBAL_BATCH, 1)
    cfg.checkpoint.out_dir = "runs/align/dpo"
    if tiny:
        cfg.checkpoint.save_every = TINY["save_every"]
    apply_flags(cfg, **flags)
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    return finish(cfg, overrides)




def check_inputs(cfg: DPOConfig) -> list[str]:
    """The prepared pairs and the ``--from`` checkpoint exist (plain file checks, no NeMo import)."""
    problems = []
    d = cfg.data.data_dir
    if d:
        for name in ("train.jsonl", "validation.jsonl"):
            if not (Path(d) / name).is_file():
                problems.append(f"data.data_dir {d}: {name} is missing. Prepare the pairs with `ellama align`.")
    problems += check_checkpoint_dir(cfg.checkpoint.restore_from, size=cfg.size)
    return problems


def build_partial(cfg: DPOConfig) -> Any:
    from ellama_recipes.engine.dpo import build_dpo_partial

    return build_dpo_partial(cfg, report=RECIPE.report())


# What `ellama align` shows for DPO and RUN2/dpo/complete.json records (read off RUN2/dpo/metrics.jsonl).
SUMMARY = {"step_key": "loss", "fields": {"final_loss": ("last", "loss"), "final_dpo_loss": ("last", "dpo_loss"),
                                          "first_dpo_loss": ("first", "dpo_loss"),
                                          "val_reward_accuracy": ("last", "val_reward_accuracy"),
                                          "val_margin": ("last", "val_margin"),
                                          "first_val_margin": ("first", "val_margin")}}


RECIPE = register(
    Recipe(
        name="dpo",
        config_cls=DPOConfig,
        build_config=build_config,
        build_partial=build_partial,
        check_inputs=check_inputs,
        summary=SUMMARY,
        description="DPO preference alignment from the SFT checkpoint (frozen reference = the SFT result)",
    )
)
