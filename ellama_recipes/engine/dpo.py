"""DPO (direct preference optimisation) on the NeMo 2 / megatron-core engine.

No NeMo 2.x release ships DPO (NeMo-Aligner is NeMo 1.x; NeMo-RL needs Ray + CUDA), so this module builds it from
the same parts pretraining uses: NeMo's ``llm.train`` with ``nl.Trainer`` + ``nl.MegatronStrategy`` (TP / PP / VPP /
DP, distributed optimizer), megatron-core's pipeline schedules and vocab-parallel cross entropy, NeMo's
checkpointing and :class:`~ellama_recipes.engine.resume.SafeAutoResume`. The references read were NeMo-Aligner's
``megatron_gpt_dpo_model.py`` (loss, chosen/rejected in one batch, summed response log-probs) and TRL's
``dpo_trainer.py`` (``sigmoid`` loss, the logged rewards / accuracies / margins).

The loss and its megatron reduction: :mod:`ellama_recipes.engine.dpo_loss`; the pairs, their order and the
interleaved micro batches: :mod:`ellama_recipes.engine.dpo_data`. This module: the model class, the reference
pass, the metrics callback, the entry function and the partial.

Reference log-probs: PRECOMPUTED ONCE, not on the fly. At the start of a fresh run (step 0, before the first
update) the policy's weights ARE the reference (both are the ``--from`` SFT checkpoint), so one forward-only pass
of the policy over every train and held-out pair, through the very same megatron model / TP / PP layout, gives
``ref_c`` and ``ref_r`` for every pair. They are stored in ``RUN/reference_logps.pt`` (atomic write) and reloaded on
resume. Why: a second frozen model on the GPUs doubles weight memory (a 405B reference is another 810 GB of bf16),
and swapping reference weights in and out every step (NeMo-Aligner's way) costs two full weight copies per step
plus a second forward; the precomputed table costs one forward pass over the data once, is exact (the same
weights, the same kernels), and keeps the checkpoint a plain Llama engine checkpoint (no reference weights in it;
``ellama export-hf --from RUN`` works unchanged). The price: the table is tied to the data; new pairs need a new run.

Pairing under TP / PP: the dataset item is a PAIR; a micro batch of ``m`` pairs is collated into ``2m`` sequences
interleaved ``[c0, r0, c1, r1, ...]`` and the Megatron step runs with micro batch size ``2m``
(:class:`PairDataSampler`), so a pair never spans two micro batches and the pipeline sends ``[seq, 2m, hidden]``
tensors between stages. Only the last pipeline stage computes the loss (megatron's schedules), where both halves of
every pair are present. TP is transparent (vocab-parallel cross entropy returns full per-token log-probs on every
TP rank). Context parallelism is refused (the per-sequence sums would need a CP all-reduce inside the loss; DPO
sequences are short enough not to need CP).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from nemo.collections import llm
from nemo.lightning.megatron_parallel import MegatronLossReduction

from ellama_recipes.engine.callbacks import MetricsJsonl, to_float
from ellama_recipes.engine.dpo_data import PreferenceDataModule, collate_pairs
from ellama_recipes.engine.dpo_loss import METRIC_KEYS, DPOLossReduction, sequence_logps
from ellama_recipes.errors import UserError
from ellama_recipes.io import metrics
from ellama_recipes.io.atomic import atomic_path

REFERENCE_FILE = "reference_logps.pt"


# ============================================================================================== model
class DPOLlamaModel(llm.LlamaModel):
    """``llm.LlamaModel`` trained with the DPO loss (same parameters: its checkpoints are Llama checkpoints).

    ``reference_logps`` (``[num_pairs, 2]``: chosen, rejected) is set by :class:`ReferenceLogps` before the first
    step; the data step looks each micro batch's pairs up in it. Nothing of it is a parameter or buffer, so it is
    never saved into the checkpoint.
    """

    def __init__(self, config, beta: float = 0.1, sft_loss_weight: float = 0.0, optim=None, tokenizer=None,
                 model_transform=None):
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform)
        self.beta = float(beta)
        self.sft_loss_weight = float(sft_loss_weight)
        self.reference_logps: torch.Tensor | None = None

    def data_step(self, dataloader_iter) -> dict[str, torch.Tensor]:
        """Device-aware GPT data step that keeps ``pair_index`` and adds the reference log-probs (last stage)."""
        from megatron.core import parallel_state

        batch = next(dataloader_iter)
        batch = batch[0] if isinstance(batch, tuple) and len(batch) == 3 else batch
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        keys = {"attention_mask"}
        if parallel_state.is_pipeline_first_stage():
            keys |= {"tokens", "position_ids"}
        last = parallel_state.is_pipeline_last_stage()
        if last:
            keys |= {"labels", "loss_mask"}
        out = {k: (v.to(dev, non_blocking=True) if k in keys and v is not None else None) for k, v in batch.items()}
        if last:
            idx = batch["pair_index"].long().cpu()
            if self.reference_logps is not None:
                ref = self.reference_logps[idx]
                out["ref_chosen"], out["ref_rejected"] = ref[:, 0].to(dev), ref[:, 1].to(dev)
            out["pair_index"] = idx
        return out

    @property
    def training_loss_reduction(self) -> DPOLossReduction:
        if not self._training_loss_reduction:
            self._training_loss_reduction = DPOLossReduction(self)
        return self._training_loss_reduction

    @property
    def validation_loss_reduction(self) -> DPOLossReduction:
        if not self._validation_loss_reduction:
            self._validation_loss_reduction = DPOLossReduction(self, validation=True)
        return self._validation_loss_reduction


# ============================================================================================== reference pass
class _CollectLogps(MegatronLossReduction):
    """Forward-only reduction: per-pair summed response log-probs ``[m, 2]`` and their pair indices."""

    def forward(self, batch, forward_out):
        logps, _ = sequence_logps(forward_out, batch["loss_mask"])
        out = torch.stack([logps[0::2], logps[1::2]], dim=1).detach()
        return torch.zeros((), device=logps.device), {"logps": out, "index": batch["pair_index"]}

    def reduce(self, losses_reduced_per_micro_batch):
        return torch.zeros(())


@torch.no_grad()
def policy_logps(trainer: pl.Trainer, pl_module: DPOLlamaModel, pairs: list[dict], *, micro_batch_size: int,
                 seq_length: int, pad_id: int, report=print) -> torch.Tensor:
    """Summed response log-probs ``[len(pairs), 2]`` of the CURRENT weights, through the megatron schedules of the
    running strategy (TP / PP / VPP as configured). Pairs are split over DP ranks and the table is all-reduced over
    DP and PP, so every rank returns the full table."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nemo.lightning.megatron_parallel import _make_data_iterator_list

    mp = trainer.strategy.model  # MegatronParallel
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    mine = list(range(dp_rank, len(pairs), dp))
    m = micro_batch_size
    # whole micro batches, a multiple of the pipeline depth (the interleaved schedule needs that); the padding
    # repeats one of this rank's own pairs and is dropped below
    n_micro = max(1, math.ceil(len(mine) / m))
    n_micro = math.ceil(n_micro / pp) * pp
    filler = mine[-1] if mine else 0
    padded = mine + [filler] * (n_micro * m - len(mine))
    micro = [collate_pairs([{**pairs[i], "pair_index": i} for i in padded[k * m:(k + 1) * m]], seq_length, pad_id)
             for k in range(n_micro)]
    own = torch.zeros(len(pairs), dtype=torch.bool)
    own[mine] = True
    reduction = _CollectLogps()
    chunks = list(mp)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()

    def step(data_iterator, model_chunk):
        batch = pl_module.data_step(data_iterator)
        out = model_chunk.forward_step(batch)
        reduction.setup(batch)
        return out, reduction

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    table = torch.zeros((len(pairs), 2), dtype=torch.float64, device=dev)
    seen = torch.zeros((len(pairs),), dtype=torch.float64, device=dev)
    group = math.ceil(64 / pp) * pp  # micro batches per schedule call
    try:
        for start in range(0, n_micro, group):
            part = micro[start:start + group]
            outs = get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=_make_data_iterator_list(chunks, iter(part)),
                model=chunks,
                num_microbatches=len(part),
                seq_length=seq_length,
                micro_batch_size=2 * m,
                forward_only=True,
            )
            for o in outs or []:
                idx = o["index"].cpu()
                keep = own[idx]  # this DP rank's pairs only (each pair is summed over DP exactly once)
                idx = idx[keep].to(dev)
                table[idx] = o["logps"][keep.to(o["logps"].device)].to(dev, torch.float64)
                seen[idx] = 1.0
            report(f"[ellama] reference log-probs: {min(start + group, n_micro)}/{n_micro} micro batches")
    finally:
        for c, t in zip(chunks, was_training):
            c.train(t)
    if torch.distributed.is_initialized():
        # each pair was computed by exactly one DP rank (on the last PP stage): sum over DP, then over PP
        torch.distributed.all_reduce(table, group=parallel_state.get_data_parallel_group())
        torch.distributed.all_reduce(seen, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(table, group=parallel_state.get_pipeline_model_parallel_group())
            torch.distributed.all_reduce(seen, group=parallel_state.get_pipeline_model_parallel_group())
    if not bool((seen > 0).all()):
        raise RuntimeError("reference pass: some pairs got no log-probs")
    return table.cpu()


class ReferenceLogps(pl.Callback):
    """Before the first DPO step: the reference log-probs of every pair (train + held out).

    Fresh run (step 0): computed with the current weights (= the ``--from`` SFT checkpoint = the reference) and
    saved to ``RUN/reference_logps.pt``. Resumed run: loaded from that file (the weights are no longer the
    reference). The file records the pair count, a fingerprint of the token ids and the reference checkpoint, so
    a table made for other data or another ``--from`` is refused.
    """

    def __init__(self, path: str, reference: str | None = None) -> None:
        self.path = Path(path)
        self.reference = reference

    @staticmethod
    def fingerprint(pairs: list[dict]) -> str:
        import hashlib

        h = hashlib.sha256()
        for p in pairs:
            for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
                h.update(json.dumps(p[k]).encode())
        return h.hexdigest()

    def on_train_start(self, trainer: pl.Trainer, pl_module: DPOLlamaModel) -> None:
        dm = trainer.datamodule
        pairs = dm.all_pairs
        fp = self.fingerprint(pairs)
        step = int(trainer.global_step)
        if step > 0 or self.path.is_file():
            if not self.path.is_file():
                raise UserError(
                    f"Resuming DPO at step {step} but {self.path} (the reference log-probs written at step 0) is "
                    "missing. Fix: start the DPO stage over (delete its run folder) from the SFT checkpoint."
                )
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved.get("fingerprint") != fp or saved.get("reference") != self.reference:
                raise UserError(
                    f"{self.path} was computed for other preference data or another reference checkpoint "
                    f"({saved.get('reference')}) than this run's ({dm.data_dir}, {self.reference}). Fix: start the DPO "
                    "stage over in a new run folder."
                )
            pl_module.reference_logps = saved["logps"]
            if trainer.global_rank == 0:
                print(f"[ellama] reference log-probs loaded from {self.path} ({len(pairs)} pairs)", flush=True)
            return
        table = policy_logps(trainer, pl_module, pairs, micro_batch_size=dm.micro_batch_size,
                             seq_length=dm.seq_length, pad_id=dm.pad_id,
                             report=(lambda s: print(s, flush=True)) if trainer.global_rank == 0 else (lambda s: None))
        pl_module.reference_logps = table
        if trainer.global_rank == 0:
            with atomic_path(self.path) as tmp:
                torch.save({"logps": table, "fingerprint": fp, "pairs": len(pairs), "reference": self.reference}, tmp)
            print(f"[ellama] reference log-probs of {len(pairs)} pairs saved to {self.path}", flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


# ============================================================================================== metrics
class DPOMetricsJsonl(MetricsJsonl):
    """``RUN/metrics.jsonl`` rows of the DPO stage: ``stage`` ("dpo"), ``step``, ``loss``, ``dpo_loss``,
    ``nll_loss``, ``reward_accuracy``, ``rewards_chosen``, ``rewards_rejected``, ``margin``, ``lr``,
    ``step_time_s``; on validation steps ``val_loss``, ``val_dpo_loss``, ``val_reward_accuracy``,
    ``val_rewards_chosen``, ``val_rewards_rejected``, ``val_margin`` over the held-out pairs. Resume handling
    (dropping rows past the resumed step) is :class:`MetricsJsonl`'s."""

    stage = "dpo"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.max_steps and step >= trainer.max_steps:
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = True  # see MetricsJsonl
        red = pl_module.training_loss_reduction
        vec = _pp_sum(torch.tensor([red.last.get(k, 0.0) for k in METRIC_KEYS], dtype=torch.float64))
        if trainer.global_rank != 0:
            return
        if step % self.log_every and step != trainer.max_steps:
            return
        # The LR this step ran with: NeMo's optimizer module logs it at the step's start. Not the optimizer's
        # param_groups here: Lightning steps the LR scheduler BEFORE on_train_batch_end, so they already hold the
        # next step's LR (the rows were one step ahead of the schedule until Dec 2026, issue 22).
        lr = trainer.callback_metrics.get("lr")
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        rec: dict[str, Any] = {"stage": self.stage, "step": int(step)}
        rec.update({k: float(v) for k, v in zip(METRIC_KEYS, vec.tolist())})
        rec["lr"] = to_float(lr)
        if trainer.callback_metrics.get("grad_norm") is not None:  # before clipping (MegatronStrategy.optimizer_step)
            rec["grad_norm"] = to_float(trainer.callback_metrics["grad_norm"])
        step_time = trainer.callback_metrics.get("train_step_timing in s")
        if step_time is not None:
            rec["step_time_s"] = to_float(step_time)
        metrics.append(self.path, rec)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        pl_module.validation_loss_reduction.val_sums = None

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        return None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        sums = pl_module.validation_loss_reduction.val_sums
        vec = torch.zeros(1 + len(METRIC_KEYS), dtype=torch.float64) if sums is None else sums.double()
        vec = _pp_sum(vec)
        if vec[0] <= 0:
            return
        means = dict(zip(METRIC_KEYS, (vec[1:] / vec[0]).tolist()))
        vals = {f"val_{k}": float(means[k]) for k in
                ("loss", "dpo_loss", "reward_accuracy", "rewards_chosen", "rewards_rejected", "margin")}
        vals["val_pairs"] = int(vec[0])
        pl_module.log_dict({k: v for k, v in vals.items() if k != "val_pairs"}, on_step=False, on_epoch=True,
                           sync_dist=False, rank_zero_only=True)
        if trainer.global_rank != 0:
            return
        step = int(trainer.global_step)
        metrics.merge_step(self.path, step, vals)
        print(f"[ellama] dpo step {step}: val_reward_accuracy={vals['val_reward_accuracy']:.3f} "
              f"val_margin={vals['val_margin']:.4f} val_loss={vals['val_loss']:.4f}", flush=True)


def _pp_sum(vec: torch.Tensor) -> torch.Tensor:
    """Sum over the pipeline group (only the last stage holds loss values; the others contribute zeros)."""
    from megatron.core import parallel_state

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return vec
    if parallel_state.get_pipeline_model_parallel_world_size() <= 1:
        return vec
    if not parallel_state.is_pipeline_last_stage():
        vec = torch.zeros_like(vec)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else vec.device
    out = vec.to(dev)
    torch.distributed.all_reduce(out, group=parallel_state.get_pipeline_model_parallel_group())
    return out.cpu()


# ============================================================================================== entry / partial
def dpo(model, data, trainer, log, optim, resume, run_dir: str | None = None, report: dict | None = None):
    """The DPO entry function of every rank: per-rank setup, ``llm.train`` (tokenizer from the data module, i.e.
    the ``--from`` checkpoint's), then ``RUN/complete.json`` on rank 0 when all steps are done."""
    from ellama_recipes.engine.runner import finish_stage, prepare_rank

    prepare_rank(run_dir)
    result = llm.train(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume,
                       tokenizer="data")
    finish_stage(trainer, run_dir, report)
    return result


def build_dpo_partial(cfg, *, report: dict | None = None) -> Any:
    """The DPO ``run.Partial`` for a :class:`ellama_recipes.recipes.dpo.DPOConfig` (not validated here).

    Shared engine blocks (:mod:`ellama_recipes.engine.blocks`): model config, trainer (strategy, precision),
    optimizer, logger (checkpoints ``RUN/checkpoints/<cfg.run_name>--step=...``), safe resume; DPO's own: the model
    class, the pair data module, the reference pass and the DPO metrics callback. ``report``: the recipe's summary
    spec for ``RUN/complete.json``.
    """
    import nemo_run as run

    from ellama_recipes.engine import blocks
    from ellama_recipes.io.run_folder import RunFolder

    folder = RunFolder.of(cfg)
    s, d = cfg.schedule, cfg.data
    src = str(blocks.abs_path(cfg.checkpoint.restore_from)) if cfg.checkpoint.restore_from else None
    # Lightning counts validation "batches" as items fetched from the loader (micro batches here, the step pulls
    # num_microbatches of them): 1.0 = the whole held-out loader, which holds exactly cfg.val_batches() global batches.
    tr = blocks.trainer(
        cfg,
        metrics=run.Config(DPOMetricsJsonl, path=str(folder.metrics), log_every=cfg.checkpoint.log_every),
        callbacks=[run.Config(ReferenceLogps, path=str(folder.root / REFERENCE_FILE), reference=src)],
        limit_val_batches=1.0,
        limit_test_batches=1,
    )
    return blocks.stage_partial(
        dpo,
        cfg,
        model=run.Config(DPOLlamaModel, config=blocks.model_config(cfg), beta=cfg.loss.beta,
                         sft_loss_weight=cfg.loss.sft_loss_weight),
        data=run.Config(
            PreferenceDataModule,
            data_dir=str(blocks.abs_path(d.data_dir)) if d.data_dir else "",
            seq_length=s.seq_length,
            micro_batch_size=s.micro_batch_size,
            global_batch_size=s.global_batch_size,
            seed=d.seed,
            num_workers=d.num_workers,
            tokenizer_from=src,
        ),
        trainer=tr,
        report=report,
    )
