"""The shared engine building blocks of every training stage, and the continued-pretraining partial.

Each block takes a :class:`ellama_recipes.config.schema.TrainConfig` (any stage's config) and returns a ``run.Config``:
:func:`model_config`, :func:`precision_plugin`, :func:`optimizer`, :func:`trainer`, :func:`logger`, :func:`resume`;
:class:`RunLayout` names the run folder's parts. A stage engine (``engine/sft.py`` ...) combines them with its own
data module and entry function; :func:`build_pretrain_partial` is the pretraining one. This is the only place the
recipes meet NeMo 2.x (``nemo.collections.llm``) and megatron-core. Building the partial imports nothing heavy beyond NeMo itself and never touches a GPU, so
``ellama pretrain --size 70b --dryrun`` works on a laptop. Launching it is ``launch.py``'s business
(NeMo-Run executors) or :func:`ellama_recipes.engine.runner.run_local` (in-process, CPU smoke runs).

What the partial holds (e-Llama continued pretraining, see DESIGN.md):

- model: ``llm.LlamaModel(Llama31Config(...))`` from ``cfg.model``, or from the ``--from`` checkpoint's own
  saved config when ``cfg.checkpoint.restore_from`` points at an existing engine checkpoint (any
  Llama-3.1-architecture model works; ``--size`` only picks the recipe defaults). On GPU the layer spec is
  Transformer Engine's (NeMo's ``default_layer_spec`` picks it when TE is importable).
- data: :class:`ellama_recipes.engine.pretrain_data.ManifestDataModule`, a ``llm.PreTrainingDataModule`` that reads
  the blend from ``manifest.json`` at run time and adds per-source (domain / general) validation.
- trainer: ``nl.Trainer`` + ``nl.MegatronStrategy`` (TP/PP/VPP/CP/SP, distributed optimizer) with the precision
  plugin (bf16-mixed, fp8 hybrid delayed / tensorwise current scaling, or fp32 for CPU).
- optim: megatron ``OptimizerConfig`` (AdamW) + ``CosineAnnealingScheduler`` (linear warmup, cosine to min LR).
- log: ``nl.NeMoLogger`` with an atomic-resume-friendly ``ModelCheckpoint`` every ``save_every`` steps,
  TensorBoard, and :class:`ellama_recipes.engine.callbacks.MetricsJsonl` writing ``RUN/metrics.jsonl``.
- resume: :class:`ellama_recipes.engine.resume.SafeAutoResume`: resume from the newest *complete* checkpoint in
  the run directory (partial / corrupt ones are skipped with a message), else start from ``--from``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nemo_run as run
import torch

from ellama_recipes.engine import bridge
from ellama_recipes.config.schema import TrainConfig
from ellama_recipes.data.manifest import MANIFEST_PLACEHOLDER

RUN_NAME = "cpt"  # the pretraining recipe's run_name (checkpoint prefix); other stages pass their own


def _abs(path: str | Path) -> Path:
    """Paths in the partial are absolute: executors (torchrun via NeMo-Run, Slurm) run it from another cwd."""
    return Path(path).expanduser().absolute()


@dataclass(frozen=True)
class RunLayout:
    """The run folder of every stage: ``RUN/checkpoints/``, ``RUN/metrics.jsonl``, ``RUN/logs/`` (NeMo text logs,
    TensorBoard in ``logs/tb_logs``, ranks > 0 in ``logs/ranks/rank-N.log``), ``RUN/resume.json``."""

    root: Path

    @classmethod
    def of(cls, cfg: TrainConfig) -> "RunLayout":
        return cls(_abs(cfg.checkpoint.out_dir))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


# ----------------------------------------------------------------------------- model


def model_config(cfg: TrainConfig) -> run.Config:
    """``run.Config(Llama31Config)`` for this recipe (from the `--from` checkpoint when it is readable here)."""
    from megatron.core.transformer.enums import AttnBackend
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    m = cfg.model
    fields: dict[str, Any] = bridge.nemo_kwargs(m)
    if cfg.checkpoint.restore_from:
        fields.update(bridge.checkpoint_nemo_kwargs(cfg.checkpoint.restore_from) or {})
    fields["seq_length"] = cfg.schedule.seq_length
    fields["attention_backend"] = getattr(AttnBackend, m.attention_backend)
    # Dropout off for continued pretraining (Llama 3 recipe); bf16/fp8 params handled by the precision plugin.
    fields["hidden_dropout"] = 0.0
    fields["attention_dropout"] = 0.0
    fields.update(p2p_fields(cfg))
    if not uses_gpu(cfg):
        # CPU processes (local, no CUDA, the size row's cpu_fallback): the TE/apex/CUDA fusions off, weights
        # allocated on the CPU, a device-aware data step. Part of the partial itself, so the dry run shows it and
        # every launched rank gets it.
        from ellama_recipes.engine import cpu_compat

        for name in cpu_compat._TE_FUSIONS:
            fields[name] = False
        fields["use_cpu_initialization"] = True
        fields["data_step_fn"] = cpu_compat.cpu_gpt_data_step
    return run.Config(Llama31Config, **fields)


def p2p_fields(cfg: TrainConfig) -> dict[str, Any]:
    """Pipeline send/recv settings of the model config: unbatched P2P for the interleaved schedule at PP = 2.

    megatron-core 0.15.3 defaults to ``batch_p2p_comm=True``: pipeline_parallel/p2p_communication.py
    ``_batched_p2p_ops`` posts ``[send_prev, recv_prev, send_next, recv_next]`` in one ``batch_isend_irecv``. With a
    pipeline group of 2 ranks, prev == next (one peer), and the interleaved (VPP) schedule's steady state
    (``send_forward_backward_recv_forward_backward``) sends an activation AND a gradient to that peer in one call.
    Point-to-point messages between one pair of ranks are matched in the order they were posted (gloo and NCCL
    alike, no tags), and both ranks post the same order while holding opposite prev/next roles, so the peer
    receives the gradient as its activation and vice versa: same shapes, no error, wrong numbers (measured on CPU
    processes: step-1 loss 8.36056 vs 8.36531 in one process, micro batches 3 and 4 wrong, 1 and 2 -- computed in
    the warm-up, before any two-way exchange -- exact). Megatron-LM issues #750 and #1450 describe the same crossing.
    The unbatched ``_p2p_ops`` orders the ops by rank parity and puts one direction on the world group when the
    pipeline group has 2 ranks, so the pairs match: PP2 x VPP2 then reproduces the single process exactly. PP > 2
    (the 70b/405b rows) has distinct prev/next peers and keeps megatron-core's batched default.
    """
    p = cfg.parallel
    if p.virtual_pipeline_parallel is not None and p.pipeline_parallel == 2:
        return {"batch_p2p_comm": False, "overlap_p2p_comm": False}
    return {}


# ----------------------------------------------------------------------------- precision
def precision_plugin(cfg: TrainConfig) -> run.Config:
    """MegatronMixedPrecision: bf16-mixed, BF16 + TE FP8 (delayed or tensorwise current scaling), or fp32."""
    from nemo.lightning.pytorch.plugins.mixed_precision import MegatronMixedPrecision

    pr = cfg.precision
    full = pr.mode == "fp32"
    dtype = torch.float32 if full else torch.bfloat16
    plugin = run.Config(
        MegatronMixedPrecision,
        precision="32" if full else "bf16-mixed",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_enabled=False,
        grad_reduce_in_fp32=True,
    )
    if full:
        return plugin
    if pr.mode == "fp8":
        plugin.fp8 = "hybrid"
        plugin.fp8_param_gather = pr.fp8_param_gather
        if pr.fp8_recipe == "delayed":  # TE DelayedScaling (NeMo bf16_with_fp8_mixed)
            plugin.fp8_recipe = "delayed"
            plugin.fp8_margin = 0
            plugin.fp8_amax_history_len = pr.fp8_amax_history_len
            plugin.fp8_amax_compute_algo = "max"
        else:  # TE Float8CurrentScaling (NeMo bf16_with_fp8_current_scaling_mixed)
            plugin.fp8_recipe = "tensorwise"
            plugin.first_last_layers_bf16 = True
            plugin.num_layers_at_start_in_bf16 = 1
            plugin.num_layers_at_end_in_bf16 = 1
    return plugin


# ----------------------------------------------------------------------------- optimizer
def optimizer(cfg: TrainConfig) -> run.Config:
    from megatron.core.optimizer import OptimizerConfig
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

    o, s = cfg.optimizer, cfg.schedule
    opt = run.Config(
        OptimizerConfig,
        optimizer=o.name,
        lr=s.lr,
        min_lr=s.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.precision.mode in ("bf16", "fp8"),
        fp16=False,
        use_distributed_optimizer=o.distributed_optimizer,
    )
    sched = run.Config(
        CosineAnnealingScheduler,
        warmup_steps=s.warmup_steps,
        constant_steps=0,
        max_steps=s.train_steps,
        min_lr=s.min_lr,
    )
    return run.Config(MegatronOptimizerModule, config=opt, lr_scheduler=sched)


# ----------------------------------------------------------------------------- trainer
def uses_gpu(cfg: TrainConfig) -> bool:
    """GPU trainer unless this is a local run on a host without CUDA of a config with ``cluster.cpu_fallback``
    (then every rank is a CPU process and ranks talk over gloo)."""
    return torch.cuda.is_available() or cfg.cluster.executor != "local" or not cfg.cluster.cpu_fallback


def trainer(cfg: TrainConfig, *, callbacks: list[run.Config] | None = None) -> run.Config:
    """``nl.Trainer`` + ``nl.MegatronStrategy`` (TP/PP/VPP/CP/SP, DDP, distributed optimizer) + precision plugin.

    Callbacks: NeMo's TimingCallback, :class:`~ellama_recipes.engine.callbacks.MetricsJsonl` writing
    ``RUN/metrics.jsonl``, then ``callbacks`` (a stage's own). CPU processes (see :func:`uses_gpu`): accelerator
    cpu with one process per "GPU" (``cluster.gpus_per_node``), gloo between them.
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

    from ellama_recipes.engine.callbacks import MetricsJsonl

    p, s, c = cfg.parallel, cfg.schedule, cfg.cluster
    gpu = uses_gpu(cfg)
    low_precision = cfg.precision.mode in ("bf16", "fp8")
    strategy = run.Config(
        nl.MegatronStrategy,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
        context_parallel_size=p.context_parallel,
        sequence_parallel=p.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if low_precision else torch.float32,
        gradient_as_bucket_view=True,
        ckpt_async_save=False,  # synchronous: the checkpoint is complete before training goes on
        # Fully-parallel load/save exchange shards between DP ranks through CUDA buffers
        # (megatron.core.dist_checkpointing.exchange_utils: `.cuda()`): CPU processes read/write their own shards.
        ckpt_parallel_load=gpu,
        ckpt_parallel_save=gpu,
        ddp=run.Config(
            DistributedDataParallelConfig,
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=gpu and cfg.data_parallel > 1,
            overlap_param_gather=gpu and cfg.optimizer.distributed_optimizer and cfg.data_parallel > 1,
            average_in_collective=True,
            use_distributed_optimizer=cfg.optimizer.distributed_optimizer,
        ),
    )
    from nemo.utils.exp_manager import TimingCallback

    callbacks = [
        run.Config(TimingCallback),  # "train_step_timing in s" (before MetricsJsonl, which records it)
        run.Config(
            MetricsJsonl,
            path=str(RunLayout.of(cfg).metrics),
            log_every=cfg.checkpoint.log_every,
        ),
        *(callbacks or []),
    ]
    val_every = min(s.val_check_interval, s.train_steps)
    return run.Config(
        nl.Trainer,
        accelerator="gpu" if gpu else "cpu",
        devices=c.gpus_per_node,
        num_nodes=c.num_nodes,
        max_steps=s.train_steps,
        accumulate_grad_batches=1,
        # per-source validation: limit_val_batches global batches of domain text, then as many of general text
        limit_val_batches=2 * s.limit_val_batches,
        limit_test_batches=s.limit_val_batches,
        val_check_interval=val_every,
        log_every_n_steps=cfg.checkpoint.log_every,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_progress_bar=True,
        plugins=precision_plugin(cfg),
        strategy=strategy,
        callbacks=callbacks,
    )


# ----------------------------------------------------------------------------- data
def data_module(cfg: TrainConfig) -> run.Config:
    from ellama_recipes.engine.pretrain_data import ManifestDataModule

    s, d = cfg.schedule, cfg.data
    return run.Config(
        ManifestDataModule,
        manifest=str(_abs(d.manifest)) if d.manifest and d.manifest != MANIFEST_PLACEHOLDER else MANIFEST_PLACEHOLDER,
        seq_length=s.seq_length,
        micro_batch_size=s.micro_batch_size,
        global_batch_size=s.global_batch_size,
        num_workers=d.num_workers,
        seed=d.seed,
        split=d.split,
        tokenizer_from=str(_abs(cfg.checkpoint.restore_from)) if cfg.checkpoint.restore_from else None,
        vocab_size=cfg.model.vocab_size,
    )


# ----------------------------------------------------------------------------- log / resume
def logger(cfg: TrainConfig, run_name: str = RUN_NAME) -> run.Config:
    """``nl.NeMoLogger`` into ``RUN/logs`` with checkpoints ``RUN/checkpoints/<run_name>--step=S-...`` every
    ``checkpoint.save_every`` steps (S = the number of optimizer steps done, as in metrics.jsonl), TensorBoard."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl

    from ellama_recipes.engine.callbacks import StepCheckpoint

    run_dir = _abs(cfg.checkpoint.out_dir)
    ckpt = run.Config(
        StepCheckpoint,
        dirpath=str(run_dir / "checkpoints"),
        monitor="step",
        mode="max",
        save_last="link",  # the -last entry is a symlink to the step checkpoint, not a second full copy
        save_top_k=cfg.checkpoint.keep_last,
        every_n_train_steps=cfg.checkpoint.save_every,
        save_on_train_epoch_end=False,
        save_optim_on_train_end=True,  # the final checkpoint stays resumable (e.g. to extend a run)
        always_save_context=True,
        filename=f"{run_name}--{{step}}-{{consumed_samples}}",
    )
    return run.Config(
        nl.NeMoLogger,
        # RUN/checkpoints/, RUN/metrics.jsonl, RUN/logs/ (NeMo's text logs, TensorBoard in RUN/logs/tb_logs/).
        # Not RUN/ itself: on every restart NeMo moves the files of its log dir into run_N/ (NeMoLogger
        # _setup_files_to_move + ModelCheckpoint.setup), which would take metrics.jsonl with them.
        explicit_log_dir=str(run_dir / "logs"),
        name=run_name,
        use_datetime_version=False,
        ckpt=ckpt,
        tensorboard=run.Config(TensorBoardLogger, save_dir="tb_logs", name=run_name),
        update_logger_directory=True,
    )


def resume(cfg: TrainConfig) -> run.Config:
    """:class:`~ellama_recipes.engine.resume.SafeAutoResume`: the newest complete checkpoint in
    ``RUN/checkpoints`` (partial / corrupt ones skipped with a message), else the ``--from`` weights (no optimizer
    state), else random initial weights (``--from-scratch``)."""
    from nemo import lightning as nl

    from ellama_recipes.engine.resume import SafeAutoResume

    restore = None
    if cfg.checkpoint.restore_from:
        restore = run.Config(
            nl.RestoreConfig,
            path=str(_abs(cfg.checkpoint.restore_from)),
            load_model_state=True,
            load_optim_state=False,
            load_artifacts=True,
        )
    return run.Config(
        SafeAutoResume,
        resume_from_directory=str(_abs(cfg.checkpoint.out_dir) / "checkpoints"),
        restore_config=restore,
        resume_if_exists=True,
        resume_ignore_no_checkpoint=True,
    )


# ----------------------------------------------------------------------------- the partial
def build_pretrain_partial(cfg: TrainConfig) -> run.Partial:
    """The continued-pretraining ``run.Partial`` for ``cfg`` (not validated here).

    Its function is :func:`ellama_recipes.engine.runner.pretrain` (``llm.pretrain`` after the per-rank setup), so
    the in-process run, every torchrun rank and every Slurm task run the same thing. Example (what
    ``ellama pretrain --size 70b --dryrun`` does)::

        from ellama_recipes.recipes.pretrain import build_config
        partial = build_pretrain_partial(build_config("70b"))
    """
    from nemo.collections import llm

    from ellama_recipes.engine.runner import pretrain

    return run.Partial(
        pretrain,
        model=run.Config(llm.LlamaModel, config=model_config(cfg)),
        data=data_module(cfg),
        trainer=trainer(cfg),
        log=logger(cfg, RUN_NAME),
        optim=optimizer(cfg),
        resume=resume(cfg),
        run_dir=str(RunLayout.of(cfg).root),
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` (UserError when missing or malformed)."""
    from ellama_recipes.engine.pretrain_data import load_manifest

    return load_manifest(path)


__all__ = [
    "RUN_NAME", "RunLayout", "build_pretrain_partial", "data_module", "logger",
    "model_config", "optimizer", "precision_plugin", "read_manifest", "resume", "trainer", "uses_gpu",
]
