"""The one size table: tiny / 8b / 70b / 405b.

Each row holds the Hugging Face repo of the base model, its architecture, the base model's max pretraining
learning rate, and the default H100 parallelism and node count of the continued-pretraining recipe.
A recipe is a shared base plus what this table says differs per size (DESIGN.md practice 3).

Parallelism defaults were chosen with :mod:`ellama_recipes.workflows.plan`'s per-GPU memory estimate for H100 80 GB at
seq 8192, micro batch 1, BF16 weights, fp32 gradient buffers, distributed optimizer, flash attention, sequence
parallel (``ellama plan --size S`` prints the breakdown):

- 8b:   TP2 PP1 CP1 SP, 8 nodes x 8 (DP 32): ~49 GiB/GPU. TP1 would need ~91 GiB (45 GiB of weights + grads
        alone, 32 GiB of activations), so TP2, which stays inside one NVLink domain.
- 70b:  TP4 PP4 VPP5 CP2 SP, 60 nodes x 8 = e-Llama's 480 H100 (DP 15): ~55 GiB/GPU; with CP1 ~77 GiB (activations
        45 GiB), too close to the limit. VPP5 (80 layers / (4*5) = 4 per virtual stage) cuts the pipeline bubble.
- 405b: TP8 PP18 VPP7 CP2 SP, 144 nodes x 8 = 1152 GPUs (DP 4): ~60 GiB/GPU; PP9 would be ~75 GiB.
        126 layers / (18*7) = 1 layer per virtual stage.
- tiny: 1 process, no model parallelism; a Llama-3.1-architecture model small enough for 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ellama_recipes.errors import UserError
from ellama_recipes.model.architecture import Architecture


@dataclass
class Parallelism:
    """How a model is split over GPUs (TP / PP / VPP / CP / SP): a size row's default, and a stage config's
    ``parallel`` (``parallel.tensor_parallel=8`` ...)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    context_parallel: int = 1
    sequence_parallel: bool = False


@dataclass(frozen=True)
class Size:
    name: str
    hf_repo: str | None
    arch: Architecture
    base_max_lr: float  # the base model's max pretraining LR (Llama 3 paper / model card)
    parallelism: Parallelism
    num_nodes: int
    gpus_per_node: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    train_steps: int
    warmup_steps: int
    # Recipe defaults that differ per size (GPU values by default; the tiny row overrides them as data).
    precision: str = "bf16"  # bf16 | fp8 | fp32
    attention_backend: str = "flash"
    distributed_optimizer: bool = True
    num_workers: int = 2  # data loader workers per rank
    val_check_interval: int = 500
    limit_val_batches: int = 32  # per validation source (domain, general)
    save_every: int = 1000
    log_every: int = 10
    # On a local host without CUDA, run the ranks as CPU processes over gloo (a smoke size); False: needs GPUs.
    cpu_fallback: bool = False
    # Per-GPU memory the planner adds for CUDA context, NCCL buffers and fragmentation (GiB).
    plan_overhead_gib: float = 5.0
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


LLAMA31_VOCAB = 128256

SIZES: dict[str, Size] = {
    "tiny": Size(
        name="tiny",
        hf_repo=None,  # built locally by ellama_recipes.model.tiny (no hub)
        arch=Architecture(
            num_layers=4,
            hidden_size=128,
            ffn_hidden_size=384,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=4096,
            max_position_embeddings=2048,
            original_max_position_embeddings=256,
        ),
        # The tiny base is randomly initialised (a stand-in, not a pretrained model), so its "base LR" is set for
        # visible learning in 40 CPU steps: CPT max LR = 0.10 x 1e-2 = 1e-3.
        base_max_lr=1e-2,
        parallelism=Parallelism(),
        num_nodes=1,
        gpus_per_node=1,
        seq_length=256,
        global_batch_size=8,
        micro_batch_size=2,
        train_steps=40,
        warmup_steps=4,
        precision="fp32",  # CPU processes: no bf16/fp8 kernels
        attention_backend="auto",
        distributed_optimizer=False,
        num_workers=0,
        val_check_interval=10,
        limit_val_batches=4,
        save_every=20,
        log_every=1,
        cpu_fallback=True,
        plan_overhead_gib=0.0,
        notes="CPU smoke size: the same recipe on a 4-layer Llama-3.1-architecture model.",
    ),
    "8b": Size(
        name="8b",
        hf_repo="meta-llama/Llama-3.1-8B",
        arch=Architecture(32, 4096, 14336, 32, 8, LLAMA31_VOCAB),
        base_max_lr=3e-4,
        parallelism=Parallelism(2, 1, None, 1, True),
        num_nodes=8,
        gpus_per_node=8,
        seq_length=8192,
        global_batch_size=1440,
        micro_batch_size=1,
        train_steps=85_000,
        warmup_steps=2000,
        notes="Tuned for H100 80GB SXM, 8 GPUs/node, NVLink within node.",
    ),
    "70b": Size(
        name="70b",
        hf_repo="meta-llama/Llama-3.1-70B",
        arch=Architecture(80, 8192, 28672, 64, 8, LLAMA31_VOCAB),
        base_max_lr=1.5e-4,
        parallelism=Parallelism(4, 4, 5, 2, True),
        num_nodes=60,
        gpus_per_node=8,
        seq_length=8192,
        global_batch_size=1440,
        micro_batch_size=1,
        train_steps=85_000,
        warmup_steps=2000,
        notes="e-Llama's scale: 60 nodes x 8 H100 80GB = 480 GPUs.",
    ),
    "405b": Size(
        name="405b",
        hf_repo="meta-llama/Llama-3.1-405B",
        arch=Architecture(126, 16384, 53248, 128, 8, LLAMA31_VOCAB),
        base_max_lr=8e-5,
        parallelism=Parallelism(8, 18, 7, 2, True),
        num_nodes=144,
        gpus_per_node=8,
        seq_length=8192,
        global_batch_size=1440,
        micro_batch_size=1,
        train_steps=85_000,
        warmup_steps=2000,
        notes="Tuned for H100 80GB SXM; 1152 GPUs.",
    ),
}


def get_size(name: str) -> Size:
    """Look a size up; an unknown name is a UserError listing the valid ones."""
    key = str(name).strip().lower()
    if key not in SIZES:
        raise UserError(f"Unknown size {name!r}. Valid sizes: {', '.join(SIZES)} (e.g. `--size 70b`).")
    return SIZES[key]
