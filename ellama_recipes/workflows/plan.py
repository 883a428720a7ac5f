"""Compute and memory planning: `ellama plan --size 70b --gpus 480 --tokens 1T`.

Compute convention (the one e-Llama's figure implies): a training token costs ``6 * N`` FLOPs, N the parameter
count (embeddings included). GPU-hours = 6 * N * tokens / (achieved TFLOP/s per GPU * 1e12 * 3600).
With e-Llama's numbers (70B, 1T tokens, 480 H100) their ~340,000 GPU-hours mean 343 TFLOP/s/GPU.
Megatron's published TFLOP/s also count attention FLOPs (~12 * layers * hidden * seq per token, +15% at 70B /
seq 8192), so divide a Megatron figure by ~1.15 before passing it as ``--tflops``.

Memory model per GPU (the largest pipeline stage), BF16 weights, Megatron DDP with fp32 gradient buffers
(NeMo's MegatronMixedPrecision default ``grad_reduce_in_fp32=True``), distributed optimizer:

- weights:     2 bytes x params_on_gpu
- gradients:   4 bytes x params_on_gpu
- optimizer:   12 bytes (fp32 master, Adam m and v) x params_on_gpu / (DP * CP)  (sharded over the DP x CP group;
               without the distributed optimizer, not divided)
- activations: Llama block with flash attention and sequence parallel, stored in BF16 per token and layer:
               2 * (5 * hidden + 2 * kv_dim + 3 * ffn) bytes, over seq * micro_batch / (TP * CP) tokens; the first
               pipeline stage keeps PP micro-batches of L/PP layers in flight under 1F1B, i.e. L layers' worth,
               times (1 + (PP-1)/(PP*VPP)) with the interleaved schedule
- logits:      fp32 logits and their gradient on the last stage: 8 bytes x seq * mbs * vocab / (TP * CP)
- overhead:    CUDA context, NCCL buffers and allocator fragmentation: the size row's plan_overhead_gib (5 GiB;
               0 for a CPU smoke size).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ellama_recipes.errors import UserError
from ellama_recipes.config.schema import TrainConfig
from ellama_recipes.model.sizes import get_size

GiB = 1024**3
H100_MEMORY_GIB = 80.0
OVERHEAD_GIB = 5.0
# Default achieved model TFLOP/s per GPU (6N convention) by precision, each with its source (shown by `ellama plan`).
# No figure of ours is measured yet: benchmarks/gpu/proof.py measures one on an H100 (docs/gpu.md, "Performance"); put it
# here, with the run's JSON as the source, once it has run.
DEFAULT_TFLOPS = {"bf16": 343.0, "fp8": 647.0, "fp32": 50.0}
TFLOPS_SOURCES = {
    "bf16": "e-Llama's implied 343 (70B, 1T tokens, 480 H100, ~340,000 GPU-hours)",
    "fp8": "Megatron-Bridge 25.11 Llama3 8B FP8 on H100, 744 TFLOP/s/GPU incl. attention FLOPs, / 1.15 = 647",
    "fp32": "a placeholder with no published anchor (fp32 is the CPU smoke path)",
}

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str | int | float) -> int:
    """'1T' -> 10**12, '500B', '2.5e11', '85000' ..."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
        if not m:
            raise UserError(
                f"--tokens {text!r} is not a token count. Use a number with an optional K/M/B/T suffix, e.g. 1T or 500B."
            )
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise UserError(f"--tokens must be positive, got {text!r}.")
    return int(value)


@dataclass
class MemoryEstimate:
    params_per_gpu: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return (
            self.weights_gib
            + self.grads_gib
            + self.optimizer_gib
            + self.activations_gib
            + self.logits_gib
            + self.overhead_gib
        )


def memory_per_gpu(cfg: TrainConfig) -> MemoryEstimate:
    m, s, p = cfg.model, cfg.schedule, cfg.parallel
    tp, pp, cp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    vpp = p.virtual_pipeline_parallel or 1
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    emb = m.vocab_size * h
    if pp == 1:
        stage_params = m.num_parameters()
    else:  # first stage holds the embedding, the last the output layer: the larger of the two
        stage_params = per_layer * math.ceil(m.num_layers / pp) + emb + h
    params_gpu = math.ceil(stage_params / tp)
    full_precision = cfg.precision.mode == "fp32"
    weight_bytes = 4 if full_precision else 2
    dp = max(cfg.data_parallel, 1)
    shard = dp * cp if cfg.optimizer.distributed_optimizer else 1
    optimizer_bytes = (8 if full_precision else 12) * params_gpu / shard

    tokens = s.seq_length * s.micro_batch_size / (tp * cp)
    act_per_token_layer = 2 * (5 * h + 2 * kv + 3 * f)
    if not p.sequence_parallel:  # norms and residuals replicated across TP ranks
        act_per_token_layer += 2 * 4 * h * (tp - 1)
    in_flight = m.num_layers * (1 + (pp - 1) / (pp * vpp)) if pp > 1 else m.num_layers
    activations = act_per_token_layer * tokens * in_flight
    logits = 8 * tokens * m.vocab_size
    if pp > 1:  # the last stage has one micro-batch of L/PP layers plus logits: compare to the first stage
        last = act_per_token_layer * tokens * m.num_layers / pp + logits
        if last <= activations:
            logits = 0.0
        else:
            activations, logits = act_per_token_layer * tokens * m.num_layers / pp, logits
    return MemoryEstimate(
        params_per_gpu=params_gpu,
        weights_gib=weight_bytes * params_gpu / GiB,
        grads_gib=4 * params_gpu / GiB,
        optimizer_gib=optimizer_bytes / GiB,
        activations_gib=activations / GiB,
        logits_gib=logits / GiB,
        overhead_gib=get_size(cfg.size).plan_overhead_gib,
    )


def compute_plan(cfg: TrainConfig, *, tokens: int | None = None, tflops: float | None = None) -> dict:
    """Steps, tokens, memory per GPU, GPU-hours and wall-clock for ``cfg`` (validated by the caller)."""
    s = cfg.schedule
    tokens_per_step = s.tokens_per_step
    if tokens is None:
        tokens = s.total_tokens
    steps = math.ceil(tokens / tokens_per_step)
    n_params = cfg.model.num_parameters()
    achieved = float(tflops) if tflops is not None else DEFAULT_TFLOPS[cfg.precision.mode]
    if achieved <= 0:
        raise UserError(f"--tflops must be positive, got {tflops}.")
    flops = 6.0 * n_params * tokens
    gpu_hours = flops / (achieved * 1e12) / 3600.0
    gpus = cfg.cluster.world_size
    wall_hours = gpu_hours / gpus
    mem = memory_per_gpu(cfg)
    tokens_per_gpu_s = achieved * 1e12 / (6.0 * n_params)
    return {
        "size": cfg.size,
        "parameters": n_params,
        "gpus": gpus,
        "num_nodes": cfg.cluster.num_nodes,
        "gpus_per_node": cfg.cluster.gpus_per_node,
        "tokens": tokens,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "global_batch_size": s.global_batch_size,
        "seq_length": s.seq_length,
        "tensor_parallel": cfg.parallel.tensor_parallel,
        "pipeline_parallel": cfg.parallel.pipeline_parallel,
        "virtual_pipeline_parallel": cfg.parallel.virtual_pipeline_parallel,
        "context_parallel": cfg.parallel.context_parallel,
        "sequence_parallel": cfg.parallel.sequence_parallel,
        "data_parallel": cfg.data_parallel,
        "precision": cfg.precision.label,
        "tflops_per_gpu": achieved,
        "tflops_source": "--tflops" if tflops is not None else (
            f"default for {cfg.precision.mode}: {TFLOPS_SOURCES[cfg.precision.mode]}"),
        "total_flops": flops,
        "tokens_per_gpu_per_s": tokens_per_gpu_s,
        "gpu_hours": gpu_hours,
        "wall_clock_hours": wall_hours,
        "wall_clock_days": wall_hours / 24.0,
        "memory_per_gpu_gib": {
            "weights": round(mem.weights_gib, 2),
            "gradients": round(mem.grads_gib, 2),
            "optimizer": round(mem.optimizer_gib, 2),
            "activations": round(mem.activations_gib, 2),
            "logits": round(mem.logits_gib, 2),
            "overhead": round(mem.overhead_gib, 2),
            "total": round(mem.total_gib, 2),
        },
        "params_per_gpu": mem.params_per_gpu,
        "fits_h100_80gb": mem.total_gib <= H100_MEMORY_GIB,
    }
