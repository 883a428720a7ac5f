"""Every rule a stage config must satisfy, each problem naming the field and its fix (DESIGN practice 1).

:meth:`ellama_recipes.config.schema.TrainConfig.problems` is :func:`problems` (the rules every stage shares, then
the schedule's own and the stage's ``stage_problems``); :meth:`~ellama_recipes.config.schema.TrainConfig.validate`
raises one :class:`~ellama_recipes.errors.ConfigError` listing all of them. ``at_launch=True`` adds what only a real
launch on this host needs (``--from``, a GPU for the GPU paths: :func:`cpu_problems` when CUDA is absent).
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("bf16", "fp8", "fp32")
FP8_RECIPES = ("delayed", "current")
EXECUTORS = ("local", "slurm")


def local_gpu_capability() -> tuple[int, int] | None:
    """Compute capability of this host's first CUDA device (None without one): the launch checks' input."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def problems(cfg: Any, *, at_launch: bool = False, gpu_capability: tuple[int, int] | None = None) -> list[str]:
    """Every problem with this config, each naming the field and the fix (empty when valid)."""
    out: list[str] = []
    m, s, p, c, o, pr = cfg.model, cfg.schedule, cfg.parallel, cfg.cluster, cfg.optimizer, cfg.precision
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
            positive("model.vocab_size", m.vocab_size),
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
    out.extend(s.problems())
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
    if cfg.checkpoint.save_every < 1:
        out.append(f"checkpoint.save_every={cfg.checkpoint.save_every} must be >= 1.")
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
        out.extend(cpu_problems(cfg))
    if at_launch:
        ck = cfg.checkpoint
        if not ck.restore_from and not ck.from_scratch:
            out.append(
                f"--from is not set: this {cfg.title} run would start from random weights. Fix: pass --from DIR "
                f"(an engine checkpoint from `ellama import-hf --size {cfg.size} --out DIR`), or --from-scratch "
                "to start from random weights on purpose."
            )
        elif ck.restore_from and ck.from_scratch:
            out.append("--from and --from-scratch contradict each other. Fix: pass only one of them.")
    out.extend(vocab_problems(cfg))
    out.extend(cfg.stage_problems(at_launch=at_launch))
    return out

def vocab_problems(cfg: Any) -> list[str]:
    """The vocabulary of the ``--from`` checkpoint at launch. Any TP works (the engine pads the embedding and output
    layer by the bridge's rule, :func:`ellama_recipes.model.architecture.padded_vocab_size`); what cannot work is a
    tokenizer with more ids than the model has embedding rows: its extra ids would index rows that do not exist
    (a crash inside every rank) or padded rows whose logits are masked (an infinite loss)."""
    from ellama_recipes.model.architecture import tokenizer_size

    ck, m = cfg.checkpoint, cfg.model
    n = tokenizer_size(ck.restore_from) if ck.restore_from else None
    if n is None or n <= m.vocab_size:
        return []
    return [
        f"model.vocab_size={m.vocab_size} (the embedding rows of --from {ck.restore_from}) is smaller than its "
        f"tokenizer ({n} tokens): ids >= {m.vocab_size} have no embedding row. Fix: resize the HF model's "
        f"embeddings to the tokenizer (transformers: model.resize_token_embeddings(len(tokenizer))) and import it "
        "again with `ellama import-hf`."
    ]


def cpu_problems(cfg: Any) -> list[str]:
    """What a local launch on a host without CUDA cannot run (CPU processes over gloo)."""
    c, p, pr = cfg.cluster, cfg.parallel, cfg.precision
    if not c.cpu_fallback:
        return [
            f"No CUDA device is visible here and the {cfg.size} recipe runs on GPUs (cluster.cpu_fallback=false). "
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
    if cfg.optimizer.distributed_optimizer:
        out.append(
            "optimizer.distributed_optimizer=true needs CUDA (megatron's distributed optimizer shards its fp32 "
            "state in CUDA buffers) and none is visible. Fix: set optimizer.distributed_optimizer=false for a "
            "CPU run."
        )
    return out


def _divisors(n: int, limit: int | None = None) -> list[int]:
    divs = [k for k in range(1, n + 1) if n % k == 0]
    return [k for k in divs if limit is None or k <= limit]
