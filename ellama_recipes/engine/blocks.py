"""The engine blocks every training stage is built from (stage-neutral: a stage adds its own parts, never removes
another's).

Each block takes a stage config (:class:`ellama_recipes.config.schema.TrainConfig`, any stage) and returns a
``run.Config``: :func:`model_config`, :func:`precision_plugin`, :func:`optimizer`, :func:`trainer` (given the stage's
metrics callback, its other callbacks and its validation limit), :func:`logger`, :func:`resume`. A stage's module
(:mod:`~ellama_recipes.engine.pretrain`, :mod:`~ellama_recipes.engine.sft`, :mod:`~ellama_recipes.engine.dpo`)
combines them with its own data module, model class and entry function into its ``run.Partial``. Building a partial
imports nothing heavy beyond NeMo itself and never touches a GPU, so ``ellama pretrain --size 70b --dryrun`` works on
a laptop. Launching it is :mod:`ellama_recipes.workflows.launch`'s business (NeMo-Run executors) or
:func:`ellama_recipes.engine.runner.run_local` (in-process, CPU smoke runs).

- model: ``llm.LlamaModel(Llama31Config(...))`` from ``cfg.model``, or from the ``--from`` checkpoint's own
  saved config when ``cfg.checkpoint.restore_from`` points at an existing engine checkpoint (any
  Llama-3.1-architecture model works; ``--size`` only picks the recipe defaults). On GPU the layer spec is
  Transformer Engine's (NeMo's ``default_layer_spec`` picks it when TE is importable).
- trainer: ``nl.Trainer`` + ``nl.MegatronStrategy`` (TP/PP/VPP/CP/SP, distributed optimizer) with the precision
  plugin (bf16-mixed, fp8 hybrid delayed / tensorwise current scaling, or fp32 for CPU).
- optim: megatron ``OptimizerConfig`` (AdamW) + ``CosineAnnealingScheduler`` (linear warmup, cosine to min LR).
- log: ``nl.NeMoLogger`` with an atomic-resume-friendly ``ModelCheckpoint`` every ``save_every`` steps and
  TensorBoard, in the run folder (:class:`ellama_recipes.io.run_folder.RunFolder`).
- resume: :class:`ellama_recipes.engine.resume.SafeAutoResume`: resume from the newest *complete* checkpoint in
  the run directory (partial / corrupt ones are skipped with a message), else start from ``--from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nemo_run as run
import torch

from ellama_recipes.config.schema import TrainConfig
from ellama_recipes.engine import bridge
from ellama_recipes.io.run_folder import RunFolder

def abs_path(path: str | Path) -> Path:
    """Paths in the partial are absolute: executors (torchrun via NeMo-Run, Slurm) run it from another cwd."""
    return Path(path).expanduser().absolute()


# ----------------------------------------------------------------------------- model


def model_config(cfg: TrainConfig) -> run.Config:
    """``run.Config(PaddedLlama31Config)`` (NeMo's Llama31Config, vocabulary padded for the run's TP by the bridge's
    rule and the padded logits masked: :mod:`ellama_recipes.engine.vocab`) for this recipe (from the `--from`
    checkpoint when it is readable here)."""
    from megatron.core.transformer.enums import AttnBackend

    from ellama_recipes.engine.vocab import PaddedLlama31Config

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
    return run.Config(PaddedLlama31Config, **fields)


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


def trainer(cfg: TrainConfig, *, metrics: run.Config, callbacks: list[run.Config] | None = None,
            limit_val_batches: int | float = 1.0, limit_test_batches: int | float | None = None) -> run.Config:
    """``nl.Trainer`` + ``nl.MegatronStrategy`` (TP/PP/VPP/CP/SP, DDP, distributed optimizer) + precision plugin.

    Callbacks: NeMo's TimingCallback, the stage's ``metrics`` callback (writing ``RUN/metrics.jsonl``: a
    :class:`~ellama_recipes.engine.callbacks.MetricsJsonl`), then the stage's other ``callbacks``.
    ``limit_val_batches``: what one validation runs, in Lightning's units (1.0 = the whole validation loader; an
    integer counts the items Lightning fetches from it, i.e. micro batches under NeMo's megatron step). CPU processes
    (see :func:`uses_gpu`): accelerator cpu with one process per "GPU" (``cluster.gpus_per_node``), gloo between them.
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

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
        run.Config(TimingCallback),  # "train_step_timing in s" (before the metrics callback, which records it)
        metrics,
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
        limit_val_batches=limit_val_batches,
        limit_test_batches=s.limit_val_batches if limit_test_batches is None else limit_test_batches,
        val_check_interval=val_every,
        log_every_n_steps=cfg.checkpoint.log_every,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_progress_bar=True,
        plugins=precision_plugin(cfg),
        strategy=strategy,
        callbacks=callbacks,
    )


# ----------------------------------------------------------------------------- log / resume
def logger(cfg: TrainConfig) -> run.Config:
    """``nl.NeMoLogger`` into ``RUN/logs`` with checkpoints ``RUN/checkpoints/<cfg.run_name>--step=S-...`` every
    ``checkpoint.save_every`` steps (S = the number of optimizer steps done, as in metrics.jsonl), TensorBoard."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl

    from ellama_recipes.engine.callbacks import StepCheckpoint

    folder, run_name = RunFolder.of(cfg), cfg.run_name
    ckpt = run.Config(
        StepCheckpoint,
        dirpath=str(folder.checkpoints),
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
        explicit_log_dir=str(folder.logs),
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
            path=str(abs_path(cfg.checkpoint.restore_from)),
            load_model_state=True,
            load_optim_state=False,
            load_artifacts=True,
        )
    return run.Config(
        SafeAutoResume,
        resume_from_directory=str(RunFolder.of(cfg).checkpoints),
        restore_config=restore,
        resume_if_exists=True,
        resume_ignore_no_checkpoint=True,
    )


# ----------------------------------------------------------------------------- the partial
def stage_partial(entry, cfg: TrainConfig, *, model: run.Config, data: run.Config, trainer: run.Config,
                  report: dict | None) -> run.Partial:
    """A stage's ``run.Partial``: its entry function with its own model, data and trainer, and the shared logger,
    optimizer, resume and run folder; ``report`` is the recipe's summary spec for ``RUN/complete.json``."""
    return run.Partial(entry, model=model, data=data, trainer=trainer, log=logger(cfg), optim=optimizer(cfg),
                       resume=resume(cfg), run_dir=str(RunFolder.of(cfg).root), report=report)


__all__ = ["abs_path", "logger", "model_config", "optimizer", "p2p_fields", "precision_plugin", "resume", "stage_partial",
           "trainer", "uses_gpu"]
