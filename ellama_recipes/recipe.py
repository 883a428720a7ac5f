"""Typed recipe specs and their validation.

A :class:`PretrainConfig` is the root: model architecture, data blend, schedule, optimizer, parallelism,
precision, cluster and checkpointing. It is plain Python (no NeMo import) so building, overriding, validating and
printing a plan is fast and testable; :mod:`ellama_recipes.engine.nemo_recipe` turns it into NeMo-Run objects.

Precedence (lowest to highest): the size table (:mod:`ellama_recipes.sizes`) -> the recipe's continued-pretraining
defaults -> CLI flags (``--nodes``, ``--fp8``, ``--steps`` ...) -> dotted ``key=value`` overrides, applied after the
recipe is built. :meth:`PretrainConfig.validate` then gathers every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal

from ellama_recipes.errors import ConfigError, UserError
from ellama_recipes.sizes import Architecture, Size, get_size

MANIFEST_PLACEHOLDER = "<unset: pass --data DIR/manifest.json (written by `ellama data build`)>"

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
    slurm_account: str | None = None
    slurm_partition: str | None = None
    slurm_time: str = "04:00:00"
    container_image: str = "nvcr.io/nvidia/nemo:25.09"
    job_dir: str | None = None  # where the executor writes scripts/logs; defaults to <checkpoint.out_dir>/launch

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class CheckpointSpec:
    restore_from: str | None = None  # engine checkpoint to continue from (`--from`, from `ellama import-hf`)
    out_dir: str = "runs/cpt"  # `--out`
    save_every: int = 1000  # `--save-every`
    keep_last: int = 2
    log_every: int = 10  # seeds: data order is data.seed; NeMo fixes the model-parallel RNG seed (1234)


@dataclass
class PretrainConfig:
    size: str
    model: ModelSpec
    schedule: ScheduleSpec
    data: DataSpec = field(default_factory=DataSpec)
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
        if m.num_query_groups % tp and tp % m.num_query_groups:
            out.append(
                f"model.num_query_groups={m.num_query_groups} (KV heads) and parallel.tensor_parallel={tp}: "
                f"one must divide the other so KV heads split (or replicate) evenly across TP ranks. "
                f"Fix: pick TP from {_divisors(m.num_query_groups)} or a multiple of {m.num_query_groups}."
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
        if at_launch and self.data.manifest in (None, "", MANIFEST_PLACEHOLDER):
            out.append(
                "data.manifest is not set. Fix: run `ellama data build ... --out DIR` and pass "
                "--data DIR/manifest.json."
            )
        return out

    def validate(self, *, at_launch: bool = False, gpu_capability: tuple[int, int] | None = None) -> "PretrainConfig":
        """Raise one :class:`ConfigError` listing every problem and its fix."""
        problems = self.problems(at_launch=at_launch, gpu_capability=gpu_capability)
        if problems:
            raise ConfigError(f"The {self.size} pretraining config has {len(problems)} problem(s):", problems=problems)
        return self

    # --------------------------------------------------------------- summaries
    def summary(self) -> dict[str, Any]:
        """The flat resolved plan (`ellama pretrain --dryrun --json`)."""
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
            "data_manifest": self.data.manifest or MANIFEST_PLACEHOLDER,
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
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        return _from_dict(cls, d)


def local_gpu_capability() -> tuple[int, int] | None:
    """Compute capability of this host's first CUDA device (None without one): the FP8 launch check's input."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- build
def build_pretrain_config(
    size: str,
    *,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    fp8: bool = False,
    fp8_recipe: str | None = None,
    executor: str | None = None,
    manifest: str | None = None,
    restore_from: str | None = None,
    out_dir: str | None = None,
    train_steps: int | None = None,
    save_every: int | None = None,
    overrides: list[str] | None = None,
) -> PretrainConfig:
    """The continued-pretraining recipe for ``size`` with flags, then dotted overrides, applied (not validated)."""
    sz: Size = get_size(size)
    tiny = sz.name == "tiny"
    cfg = PretrainConfig(
        size=sz.name,
        model=ModelSpec.from_arch(sz.arch),
        schedule=ScheduleSpec(
            base_max_lr=sz.base_max_lr,
            warmup_steps=sz.warmup_steps,
            train_steps=sz.train_steps,
            global_batch_size=sz.global_batch_size,
            micro_batch_size=sz.micro_batch_size,
            seq_length=sz.seq_length,
            val_check_interval=10 if tiny else 500,
            limit_val_batches=4 if tiny else 32,
        ),
        parallel=ParallelSpec(**dataclasses.asdict(sz.parallelism)),
        cluster=ClusterSpec(num_nodes=sz.num_nodes, gpus_per_node=sz.gpus_per_node),
        precision=PrecisionSpec(mode="fp32" if tiny else "bf16"),
        checkpoint=CheckpointSpec(save_every=20 if tiny else 1000, log_every=1 if tiny else 10),
    )
    if tiny:
        cfg.model.attention_backend = "auto"
        cfg.optimizer.distributed_optimizer = False
        cfg.data.num_workers = 0
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
    if manifest is not None:
        cfg.data.manifest = str(manifest)
    if restore_from is not None:
        cfg.checkpoint.restore_from = str(restore_from)
    if out_dir is not None:
        cfg.checkpoint.out_dir = str(out_dir)
    if train_steps is not None:
        cfg.schedule.train_steps = train_steps
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, max(train_steps // 10, 0))
    if save_every is not None:
        cfg.checkpoint.save_every = save_every
    if restore_from is not None and Path(restore_from).is_dir():
        # The model really trained is the `--from` checkpoint's (any Llama-3.1 architecture); --size only picks the
        # recipe defaults. Validate and summarise that one.
        from ellama_recipes.engine.nemo_recipe import model_spec_from_checkpoint

        for key, value in (model_spec_from_checkpoint(restore_from) or {}).items():
            setattr(cfg.model, key, value)
    apply_overrides(cfg, overrides or [])
    return cfg


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


def apply_overrides(cfg: PretrainConfig, overrides: list[str]) -> PretrainConfig:
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
