"""Typed recipe specs shared by every training stage, and their validation.

:class:`TrainConfig` is the base of every stage's config (pretrain, sft, dpo): model architecture, schedule,
optimizer, parallelism, precision, cluster and checkpointing. A stage subclasses it with its own spec (pretraining:
:class:`DataSpec`, the data blend) and sets ``stage``; its recipe in :mod:`ellama_recipes.recipes` owns its
defaults and builds its NeMo-Run partial through the engine. Everything here is plain Python (no NeMo import, no
``ellama_recipes.engine`` import), so building, overriding, validating and printing a plan is fast and testable.

Precedence (lowest to highest): the size table (:mod:`ellama_recipes.model.sizes`) -> the stage recipe's defaults ->
CLI flags (``--nodes``, ``--fp8``, ``--steps`` ...) -> dotted ``key=value`` overrides, applied after the recipe is
built. :meth:`TrainConfig.validate` then gathers every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ellama_recipes.data.manifest import MANIFEST_PLACEHOLDER  # noqa: F401 (re-exported for the recipes)
from ellama_recipes.errors import ConfigError, UserError
from ellama_recipes.model.sizes import Architecture, Size, get_size

PRECISIONS = ("bf16", "fp8", "fp32")
FP8_RECIPES = ("delayed", "current")
EXECUTORS = ("local", "slurm")


@dataclass
class ModelSpec:
    """Llama 3.1 architecture (the `--from` checkpoint's own config wins for real runs)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling_factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool = False
    attention_backend: Literal["flash", "fused", "unfused", "local", "auto"] = "flash"

    @classmethod
    def from_arch(cls, arch: Architecture) -> "ModelSpec":
        return cls(**dataclasses.asdict(arch))

    def arch(self) -> Architecture:
        fields = {f.name for f in dataclasses.fields(Architecture)}
        return Architecture(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class DataSpec:
    manifest: str | None = None  # path to manifest.json from `ellama data build`
    split: str = "990,10,0"  # train, validation, test documents per 1000 (Megatron split string)
    num_workers: int = 2
    seed: int = 1234


@dataclass
class ScheduleSpec:
    """e-Llama continued pretraining: max LR = lr_fraction x the base model's max LR, warmup, cosine decay."""

    base_max_lr: float
    lr_fraction: float = 0.10
    min_lr_ratio: float = 0.10  # min LR = min_lr_ratio x max LR at the end of the cosine
    warmup_steps: int = 2000
    train_steps: int = 85_000
    global_batch_size: int = 1440
    micro_batch_size: int = 1
    seq_length: int = 8192
    val_check_interval: int = 500
    # batches per validation source: the domain set, then the general set (the trainer runs 2x this many)
    limit_val_batches: int = 32

    @property
    def lr(self) -> float:
        return self.base_max_lr * self.lr_fraction

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.train_steps


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
class ParallelSpec:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    context_parallel: int = 1
    sequence_parallel: bool = False


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

    size: str
    model: ModelSpec
    schedule: ScheduleSpec
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
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

    # ------------------------------------------------------------- validation
    def problems(self, *, at_launch: bool = False, gpu_capability: tuple[int, int] | None = None) -> list[str]:
        """Every problem with this config, each naming the field and the fix (empty when valid)."""
        out: list[str] = []
        m, s, p, c, o, pr = self.model, self.schedule, self.parallel, self.cluster, self.optimizer, self.precision
        tp, pp, cp, vpp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.virtual_pipeline_parallel

        def positive(name: str, value: Any) -> bool:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name}={value!r} must be a positive integer.")
                return False
            return True

        ok = all(
            [
                positive("parallel.tensor_parallel", tp),
                positive("parallel.pipeline_parallel", pp),
                positive("parallel.context_parallel", cp),
                positive("cluster.num_nodes", c.num_nodes),
                positive("cluster.gpus_per_node", c.gpus_per_node),
                positive("schedule.global_batch_size", s.global_batch_size),
                positive("schedule.micro_batch_size", s.micro_batch_size),
                positive("schedule.seq_length", s.seq_length),
                positive("schedule.train_steps", s.train_steps),
                positive("model.num_layers", m.num_layers),
                positive("model.num_attention_heads", m.num_attention_heads),
                positive("model.num_query_groups", m.num_query_groups),
            ]
        )
        if vpp is not None:
            ok = positive("parallel.virtual_pipeline_parallel", vpp) and ok
        if not ok:
            return out

        world = c.world_size
        mp = tp * pp * cp
        if world % mp:
            out.append(
                f"world size {world} (cluster.num_nodes={c.num_nodes} x cluster.gpus_per_node={c.gpus_per_node}) "
                f"is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {mp}; world size must equal TP*PP*CP*DP. "
                f"Fix: use a node count that makes the world size a multiple of {mp}, or change the parallelism."
            )
        dp = world // mp if world % mp == 0 else None

        if m.num_attention_heads % tp:
            out.append(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor_parallel={tp}. "
                f"Fix: pick TP from {_divisors(m.num_attention_heads, limit=c.gpus_per_node)}."
            )
        if m.num_attention_heads % m.num_query_groups:
            out.append(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"model.num_query_groups={m.num_query_groups} (GQA needs whole groups)."
            )
        if m.num_query_groups % tp:
            # megatron-core's TransformerConfig splits KV heads across TP ranks and never replicates them.
            out.append(
                f"model.num_query_groups={m.num_query_groups} (KV heads) is not divisible by parallel.tensor_parallel="
                f"{tp}: megatron-core splits the KV heads across TP ranks (no replication). "
                f"Fix: pick TP from {_divisors(m.num_query_groups)}."
            )
        if m.num_layers % pp:
            out.append(
                f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_parallel={pp}. "
                f"Fix: pick PP from {_divisors(m.num_layers, limit=64)}."
            )
        elif vpp is not None:
            if pp == 1:
                out.append(
                    "parallel.virtual_pipeline_parallel is set but parallel.pipeline_parallel=1. "
                    "Fix: set parallel.virtual_pipeline_parallel=null or use PP > 1."
                )
            elif m.num_layers % (pp * vpp):
                out.append(
                    f"model.num_layers={m.num_layers} is not divisible by PP*VPP = {pp}*{vpp} = {pp * vpp}. "
                    f"Fix: pick VPP from {_divisors(m.num_layers // pp)}."
                )
        if dp is not None and s.global_batch_size % (s.micro_batch_size * dp):
            out.append(
                f"schedule.global_batch_size={s.global_batch_size} is not divisible by micro_batch_size*DP = "
                f"{s.micro_batch_size}*{dp} = {s.micro_batch_size * dp}. Fix: change the node count, the parallelism, "
                f"or set schedule.global_batch_size to a multiple of {s.micro_batch_size * dp}."
            )
        elif dp is not None and vpp is not None and pp > 1 and (s.global_batch_size // (s.micro_batch_size * dp)) % pp:
            # megatron's interleaved schedule refuses a last group of micro batches smaller than PP
            micro = s.global_batch_size // (s.micro_batch_size * dp)
            out.append(
                f"the interleaved pipeline (parallel.virtual_pipeline_parallel={vpp}) needs "
                f"micro batches per step ({micro} = global batch / (micro batch x DP)) to be a multiple of "
                f"parallel.pipeline_parallel={pp}. Fix: set schedule.global_batch_size to a "
                f"multiple of {s.micro_batch_size * dp * pp}, or parallel.virtual_pipeline_parallel=null."
            )
        if cp > 1 and s.seq_length % (2 * cp):
            out.append(
                f"schedule.seq_length={s.seq_length} must be divisible by 2*CP = {2 * cp} when context parallel is on "
                f"(load-balanced CP splits each sequence into 2*CP chunks)."
            )
        if p.sequence_parallel and tp == 1:
            out.append(
                "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1. "
                "Fix: set parallel.sequence_parallel=false or raise TP."
            )
        elif p.sequence_parallel and s.seq_length % (tp * cp):
            out.append(
                f"schedule.seq_length={s.seq_length} must be divisible by TP*CP = {tp}*{cp} = {tp * cp} with "
                "parallel.sequence_parallel=true (each rank's share of the sequence, seq_length / CP, is split "
                f"across the TP ranks). Fix: set schedule.seq_length to a multiple of {tp * cp}."
            )
        if s.warmup_steps >= s.train_steps:
            out.append(
                f"schedule.warmup_steps={s.warmup_steps} must be smaller than schedule.train_steps={s.train_steps}."
            )
        if not 0 < s.lr_fraction <= 1:
            out.append(f"schedule.lr_fraction={s.lr_fraction} must be in (0, 1] (e-Llama: 0.10; sweep 0.05..0.20).")
        if not 0 <= s.min_lr_ratio <= 1:
            out.append(f"schedule.min_lr_ratio={s.min_lr_ratio} must be in [0, 1].")
        if s.seq_length > m.max_position_embeddings:
            out.append(
                f"schedule.seq_length={s.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}."
            )
        if not 0 <= o.weight_decay < 1:
            out.append(f"optimizer.weight_decay={o.weight_decay} must be in [0, 1).")
        if o.clip_grad < 0:
            out.append(f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping).")
        if pr.mode not in PRECISIONS:
            out.append(f"precision.mode={pr.mode!r} must be one of {', '.join(PRECISIONS)}.")
        if pr.fp8_recipe not in FP8_RECIPES:
            out.append(f"precision.fp8_recipe={pr.fp8_recipe!r} must be one of {', '.join(FP8_RECIPES)}.")
        if c.executor not in EXECUTORS:
            out.append(f"cluster.executor={c.executor!r} must be one of {', '.join(EXECUTORS)}.")
        if self.checkpoint.save_every < 1:
            out.append(f"checkpoint.save_every={self.checkpoint.save_every} must be >= 1.")
        if at_launch and pr.mode == "fp8" and c.executor == "local":  # Slurm: checked on the compute nodes
            if gpu_capability is None:
                out.append(
                    "precision.mode=fp8 needs an NVIDIA Hopper (H100, sm_90) or newer GPU, and no CUDA device is "
                    "visible here. Fix: launch on H100 nodes (e.g. --executor slurm) or drop --fp8."
                )
            elif tuple(gpu_capability) < (9, 0):
                out.append(
                    f"precision.mode=fp8 needs compute capability >= 9.0 (Hopper); this GPU is sm_"
                    f"{gpu_capability[0]}{gpu_capability[1]}. Fix: drop --fp8 (use bf16) or run on H100/H200/B200."
                )
        if at_launch and c.executor == "local" and gpu_capability is None:
            out.extend(self._cpu_problems())
        if at_launch:
            ck = self.checkpoint
            if not ck.restore_from and not ck.from_scratch:
                out.append(
                    f"--from is not set: this {self.title} run would start from random weights. Fix: pass --from DIR "
                    f"(an engine checkpoint from `ellama import-hf --size {self.size} --out DIR`), or --from-scratch "
                    "to start from random weights on purpose."
                )
            elif ck.restore_from and ck.from_scratch:
                out.append("--from and --from-scratch contradict each other. Fix: pass only one of them.")
        out.extend(self.stage_problems(at_launch=at_launch))
        return out

    def _cpu_problems(self) -> list[str]:
        """What a local launch on a host without CUDA cannot run (CPU processes over gloo)."""
        c, p, pr = self.cluster, self.parallel, self.precision
        if not c.cpu_fallback:
            return [
                f"No CUDA device is visible here and the {self.size} recipe runs on GPUs (cluster.cpu_fallback=false). "
                "Fix: launch on GPU nodes (e.g. --executor slurm), or use a CPU smoke size (--size tiny)."
            ]
        out = []
        if pr.mode == "bf16":
            out.append(
                "precision.mode=bf16 needs a CUDA GPU (megatron's mixed-precision optimizer wraps "
                "torch.cuda tensors) and none is visible. Fix: set precision.mode=fp32 for a CPU run."
            )
        if p.sequence_parallel:
            out.append(
                "parallel.sequence_parallel=true needs CUDA (Transformer Engine's layer norms: megatron-core's TE-free "
                "layer spec, the one CPU processes build, refuses it) and none is visible. Fix: set "
                "parallel.sequence_parallel=false for a CPU run."
            )
        if p.context_parallel > 1:
            out.append(
                f"parallel.context_parallel={p.context_parallel} needs CUDA attention kernels (Transformer Engine "
                "ring attention) and none is visible. Fix: set parallel.context_parallel=1 for a CPU run."
            )
        if self.optimizer.distributed_optimizer:
            out.append(
                "optimizer.distributed_optimizer=true needs CUDA (megatron's distributed optimizer shards its fp32 "
                "state in CUDA buffers) and none is visible. Fix: set optimizer.distributed_optimizer=false for a "
                "CPU run."
            )
        return out

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
            "lr": s.lr,
            "min_lr": s.min_lr,
            "lr_fraction": s.lr_fraction,
            "base_max_lr": s.base_max_lr,
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
            "parameters": self.model.arch().num_parameters(),
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
        return _from_dict(cls, d)


def local_gpu_capability() -> tuple[int, int] | None:
    """Compute capability of this host's first CUDA device (None without one): the launch checks' input."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- build
# The model.* keys that describe the architecture (what a `--from` checkpoint fixes).
ARCH_KEYS = tuple(f.name for f in dataclasses.fields(Architecture))


def base_config(cls: type, sz: Size, schedule: ScheduleSpec, **stage_fields: Any) -> Any:
    """A stage config (``cls``, a TrainConfig subclass) with everything the size row says, and ``schedule``."""
    return cls(
        size=sz.name,
        model=ModelSpec(**dataclasses.asdict(sz.arch), attention_backend=sz.attention_backend),
        schedule=schedule,
        optimizer=OptimizerSpec(distributed_optimizer=sz.distributed_optimizer),
        parallel=ParallelSpec(**dataclasses.asdict(sz.parallelism)),
        cluster=ClusterSpec(num_nodes=sz.num_nodes, gpus_per_node=sz.gpus_per_node, cpu_fallback=sz.cpu_fallback),
        precision=PrecisionSpec(mode=sz.precision),  # type: ignore[arg-type]
        checkpoint=CheckpointSpec(save_every=sz.save_every, log_every=sz.log_every),
        **stage_fields,
    )


def apply_flags(
    cfg: TrainConfig,
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
) -> TrainConfig:
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


def finish_config(cfg: TrainConfig, overrides: list[str] | None) -> TrainConfig:
    """Apply the dotted overrides, then take the architecture from the `--from` checkpoint (not validated).

    The model really trained is the `--from` checkpoint's (any Llama-3.1 architecture); ``--size`` only picks the
    recipe defaults. An architecture override (``model.num_layers=...``) together with ``--from`` would be shown by
    the dry run and then replaced by the checkpoint's architecture in training, so it is refused (exit 2).
    """
    overrides = list(overrides or [])
    if cfg.checkpoint.restore_from:
        arch = [o for o in overrides if o.split("=", 1)[0].strip() in {f"model.{k}" for k in ARCH_KEYS}]
        if arch:
            raise UserError(
                f"{', '.join(arch)}: the model architecture comes from the --from checkpoint "
                f"({cfg.checkpoint.restore_from}), so model.* architecture overrides cannot apply to it. Fix: drop "
                "them, or build a checkpoint with that architecture (`ellama import-hf`) and pass it with --from."
            )
    apply_overrides(cfg, overrides)
    if cfg.checkpoint.restore_from:
        for key, value in (checkpoint_architecture(cfg.checkpoint.restore_from) or {}).items():
            setattr(cfg.model, key, value)
    return cfg


def checkpoint_architecture(path: str | Path) -> dict[str, Any] | None:
    """The architecture of an engine checkpoint as :class:`ModelSpec` field values (None when not readable).

    Reads ``context/model.yaml`` (NeMo's serialised model config) as plain YAML with the one config bridge's field
    table (:data:`ellama_recipes.engine.bridge.CONFIG_FIELDS`): no NeMo import, so dry runs stay fast.
    """
    f = Path(path) / "context" / "model.yaml"
    if not f.is_file():
        return None
    import yaml

    from ellama_recipes.engine.bridge import CONFIG_FIELDS  # plain table (the module imports NeMo lazily)

    try:
        saved = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("config") or {}
    except yaml.YAMLError:
        return None
    return {f.spec: saved[f.nemo] for f in CONFIG_FIELDS if f.nemo and saved.get(f.nemo) is not None}

# ------------------------------------------------------------------------ overrides
def config_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key an override may set."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys.extend(config_keys(value, name + "."))
        else:
            keys.append(name)
    return keys


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides (dotted keys, typed by the field). Every bad one is reported at once."""
    problems: list[str] = []
    valid = config_keys(cfg)
    for item in overrides:
        if "=" not in item:
            problems.append(
                f"{item!r} is not a key=value override (e.g. schedule.lr_fraction=0.05). "
                f"Flags go before the overrides: check the spelling with `--help`."
            )
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            if not close:  # match on the last component too (e.g. `lr_fraction` -> schedule.lr_fraction)
                close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
            hint = f" Did you mean: {', '.join(close)}?" if close else " Run with --dryrun --json to see the keys."
            problems.append(f"Unknown config key {key!r}.{hint}")
            continue
        parent = cfg
        *path, leaf = key.split(".")
        for part in path:
            parent = getattr(parent, part)
        ftype = {f.name: f.type for f in dataclasses.fields(parent)}[leaf]
        hints = typing.get_type_hints(type(parent))
        try:
            setattr(parent, leaf, _coerce(raw.strip(), hints.get(leaf, ftype)))
        except ValueError as exc:
            problems.append(f"{key}={raw!r}: {exc}")
    if problems:
        raise UserError(f"{len(problems)} bad override(s):", problems=problems)
    return cfg


def _coerce(raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(raw, a)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        return raw
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(float(raw)) if float(raw).is_integer() else int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    raise ValueError(f"cannot set a field of type {tp}")


def _from_dict(cls: Any, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp = hints[f.name]
        kwargs[f.name] = _from_dict(tp, d[f.name]) if dataclasses.is_dataclass(tp) else d[f.name]
    return cls(**kwargs)


def _divisors(n: int, limit: int | None = None) -> list[int]:
    divs = [k for k in range(1, n + 1) if n % k == 0]
    return [k for k in divs if limit is None or k <= limit]
