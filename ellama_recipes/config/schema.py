"""The typed config every training stage shares: a root dataclass with one ``validate()`` (DESIGN practice 1).

:class:`TrainConfig` is the base of every stage's config (pretrain, sft, dpo): the model (:class:`ModelConfig`: the
one :class:`~ellama_recipes.model.architecture.Architecture` plus the attention backend), the schedule, optimizer,
parallelism (:class:`~ellama_recipes.model.sizes.Parallelism`, the size table's), precision, cluster and
checkpointing. A stage subclasses it in its recipe module (:mod:`ellama_recipes.recipes`), sets ``stage``, adds its
own spec fields (pretraining: the data blend; SFT: the chat rows; DPO: the pairs and the loss) and may narrow the
schedule type (pretraining's LR is a fraction of the base model's: :class:`CPTSchedule`; SFT's and DPO's is their
own: :class:`PeakSchedule`). Plain Python (no NeMo, no engine import): building, overriding, validating and
printing a plan is fast and testable.

- the rules: :mod:`ellama_recipes.config.rules` (:meth:`TrainConfig.problems` / :meth:`TrainConfig.validate`);
- ``key=value`` overrides: :mod:`ellama_recipes.config.overrides`;
- a config from a size row, the shared CLI flags, the ``--from`` checkpoint's architecture:
  :mod:`ellama_recipes.config.build`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ellama_recipes.config import overrides, rules
from ellama_recipes.errors import ConfigError
from ellama_recipes.model.architecture import Architecture, vocab_padding_note
from ellama_recipes.model.sizes import Parallelism


@dataclass
class ModelConfig(Architecture):
    """The model a stage trains: its :class:`~ellama_recipes.model.architecture.Architecture` (the ``--from``
    checkpoint's own for real runs) and how attention is computed."""

    attention_backend: Literal["flash", "fused", "unfused", "local", "auto"] = "flash"


@dataclass(kw_only=True)
class ScheduleSpec:
    """What every stage's schedule has: linear warmup then cosine decay to ``min_lr_ratio`` x the peak LR, batch,
    sequence and validation cadence. The peak LR itself (``lr``) is the subclass's: :class:`CPTSchedule`,
    :class:`PeakSchedule`."""

    min_lr_ratio: float = 0.10  # min LR = min_lr_ratio x max LR at the end of the cosine
    warmup_steps: int = 2000
    train_steps: int = 85_000
    global_batch_size: int = 1440
    micro_batch_size: int = 1
    seq_length: int = 8192
    val_check_interval: int = 500
    # global batches per validation set (pretraining: per source, the domain set then the general set)
    limit_val_batches: int = 32

    @property
    def lr(self) -> float:
        raise NotImplementedError

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.train_steps

    def lr_summary(self) -> dict[str, Any]:
        return {"lr": self.lr, "min_lr": self.min_lr}

    def problems(self) -> list[str]:
        if not 0 <= self.min_lr_ratio <= 1:
            return [f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]."]
        return []


@dataclass(kw_only=True)
class CPTSchedule(ScheduleSpec):
    """Continued pretraining (e-Llama): peak LR = ``lr_fraction`` x the base model's own max pretraining LR."""

    base_max_lr: float  # the base model's max pretraining LR (the size row's)
    lr_fraction: float = 0.10

    @property
    def lr(self) -> float:
        return self.base_max_lr * self.lr_fraction

    def lr_summary(self) -> dict[str, Any]:
        return {**super().lr_summary(), "lr_fraction": self.lr_fraction, "base_max_lr": self.base_max_lr}

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 < self.lr_fraction <= 1:
            out.append(f"schedule.lr_fraction={self.lr_fraction} must be in (0, 1] (e-Llama: 0.10; sweep 0.05..0.20).")
        return out


@dataclass(kw_only=True)
class PeakSchedule(ScheduleSpec):
    """A post-training stage's schedule: its own peak LR (``schedule.max_lr``; SFT: Tulu 3's, DPO: Llama 3's)."""

    max_lr: float

    @property
    def lr(self) -> float:
        return self.max_lr

    def problems(self) -> list[str]:
        out = super().problems()
        if not (isinstance(self.max_lr, (int, float)) and self.max_lr > 0):
            out.append(f"schedule.max_lr={self.max_lr!r} must be > 0.")
        return out


@dataclass
class OptimizerSpec:
    name: Literal["adam"] = "adam"  # AdamW (decoupled weight decay)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    distributed_optimizer: bool = True


@dataclass
class PrecisionSpec:
    """bf16 (default), fp8 via Transformer Engine (H100+), fp32 (CPU smoke runs)."""

    mode: Literal["bf16", "fp8", "fp32"] = "bf16"
    fp8_recipe: Literal["delayed", "current"] = "delayed"  # TE DelayedScaling vs Float8CurrentScaling
    fp8_amax_history_len: int = 1024
    fp8_param_gather: bool = True

    @property
    def label(self) -> str:
        return f"fp8-{self.fp8_recipe}" if self.mode == "fp8" else ("bf16-mixed" if self.mode == "bf16" else "32")


@dataclass
class ClusterSpec:
    num_nodes: int = 1
    gpus_per_node: int = 8
    executor: Literal["local", "slurm"] = "local"
    # Local launch on a host without CUDA: run the ranks as CPU processes over gloo (the size row's cpu_fallback).
    cpu_fallback: bool = False
    slurm_account: str | None = None
    slurm_partition: str | None = None
    slurm_time: str = "04:00:00"  # the job's time limit; Slurm ends the job there (see slurm_retries)
    slurm_retries: int = 3  # NeMo-Run's sbatch script requeues a job that exited non-zero this many times
    container_image: str = "nvcr.io/nvidia/nemo:25.09"
    job_dir: str | None = None  # where the executor writes scripts/logs; defaults to <checkpoint.out_dir>/launch

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class CheckpointSpec:
    restore_from: str | None = None  # engine checkpoint to continue from (`--from`, from `ellama import-hf`)
    from_scratch: bool = False  # `--from-scratch`: random initial weights on purpose (no --from)
    out_dir: str = "runs/cpt"  # `--out`
    save_every: int = 1000  # `--save-every`
    keep_last: int = 2
    log_every: int = 10  # seeds: data order is data.seed; NeMo fixes the model-parallel RNG seed (1234)


@dataclass
class TrainConfig:
    """The base of every stage's config: what all training stages share.

    A stage subclasses it, sets ``stage`` (its registry name, e.g. ``"pretrain"``) and ``title`` (used in
    messages), adds its own spec field(s) (pretraining: ``data: DataSpec``) and may extend
    :meth:`stage_problems` / :meth:`stage_summary`.
    """

    stage: ClassVar[str] = "train"
    title: ClassVar[str] = "training"
    # checkpoint files (RUN/checkpoints/<run_name>--step=...), NeMo's log name, the NeMo-Run experiment's name
    run_name: ClassVar[str] = "train"

    size: str
    model: ModelConfig
    schedule: ScheduleSpec
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    parallel: Parallelism = field(default_factory=Parallelism)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)

    # ----------------------------------------------------------------- derived
    @property
    def model_parallel_size(self) -> int:
        p = self.parallel
        return p.tensor_parallel * p.pipeline_parallel * p.context_parallel

    @property
    def data_parallel(self) -> int:
        return max(self.cluster.world_size // max(self.model_parallel_size, 1), 0)

    def runs_on_cpu(self, gpu_capability: tuple[int, int] | None) -> bool:
        """True when a launch on this host runs CPU processes over gloo (local executor, no CUDA, cpu_fallback)."""
        return self.cluster.executor == "local" and gpu_capability is None and self.cluster.cpu_fallback

    @property
    def experiment_name(self) -> str:
        """The NeMo-Run experiment (and sbatch script) name: ``ellama-<run_name>-<size>``."""
        return f"ellama-{self.run_name}-{self.size}"

    # ------------------------------------------------------------- validation
    def problems(self, *, at_launch: bool = False, gpu_capability: tuple[int, int] | None = None) -> list[str]:
        """Every problem with this config, each naming the field and the fix (empty when valid):
        :func:`ellama_recipes.config.rules.problems`."""
        return rules.problems(self, at_launch=at_launch, gpu_capability=gpu_capability)

    def stage_problems(self, *, at_launch: bool = False) -> list[str]:
        """Stage-specific problems (a subclass hook; the base has none)."""
        return []

    def validate(self, *, at_launch: bool = False, gpu_capability: tuple[int, int] | None = None) -> "TrainConfig":
        """Raise one :class:`ConfigError` listing every problem and its fix."""
        problems = self.problems(at_launch=at_launch, gpu_capability=gpu_capability)
        if problems:
            raise ConfigError(f"The {self.size} {self.title} config has {len(problems)} problem(s):", problems=problems)
        return self

    # --------------------------------------------------------------- summaries
    def stage_summary(self) -> dict[str, Any]:
        """Stage-specific rows of :meth:`summary`, shown after ``precision`` (a subclass hook)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """The flat resolved plan (`ellama <stage> --dryrun --json`)."""
        s, p, c = self.schedule, self.parallel, self.cluster
        return {
            "size": self.size,
            **s.lr_summary(),
            "warmup_steps": s.warmup_steps,
            "lr_schedule": "linear warmup + cosine decay",
            "global_batch_size": s.global_batch_size,
            "micro_batch_size": s.micro_batch_size,
            "seq_length": s.seq_length,
            "train_steps": s.train_steps,
            "tokens_per_step": s.tokens_per_step,
            "total_tokens": s.total_tokens,
            "tensor_parallel": p.tensor_parallel,
            "pipeline_parallel": p.pipeline_parallel,
            "virtual_pipeline_parallel": p.virtual_pipeline_parallel,
            "context_parallel": p.context_parallel,
            "sequence_parallel": p.sequence_parallel,
            "data_parallel": self.data_parallel,
            "num_nodes": c.num_nodes,
            "gpus_per_node": c.gpus_per_node,
            "world_size": c.world_size,
            "precision": self.precision.label,
            **self.stage_summary(),
            "optimizer": {
                "name": "adamw",
                "betas": [self.optimizer.adam_beta1, self.optimizer.adam_beta2],
                "eps": self.optimizer.adam_eps,
                "weight_decay": self.optimizer.weight_decay,
                "clip_grad": self.optimizer.clip_grad,
                "distributed_optimizer": self.optimizer.distributed_optimizer,
            },
            "attention_backend": self.model.attention_backend,
            # the bridge's padded-vocab row (model.architecture.padded_vocab_size): "vocab 1495 -> padded 1536 at TP2"
            "vocab_padding": vocab_padding_note(self.model.vocab_size, p.tensor_parallel),
            "parameters": self.model.num_parameters(),
            "restore_from": self.checkpoint.restore_from,
            "out_dir": self.checkpoint.out_dir,
            "save_every": self.checkpoint.save_every,
            "executor": c.executor,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return overrides.from_dict(cls, d)
