"""Supervised fine-tuning on the Megatron engine: ``llm.finetune`` with our own loss-masked chat data.

What :func:`build_sft_partial` holds (``run.Partial`` of :func:`finetune`, the entry function of every rank):

- model: ``llm.LlamaModel`` with the `--from` checkpoint's architecture (:func:`blocks.model_config`),
  full-parameter (no PEFT); initial weights restored from ``--from`` (:func:`blocks.resume`), or from the
  newest complete checkpoint of ``RUN/checkpoints`` after a crash.
- data: :class:`SFTDataModule` over the pre-tokenized rows that :func:`ellama_recipes.data.chat.prepare` wrote
  (``{"input_ids", "loss_mask"}``). The loss mask is OURS (assistant tokens only, from the chat-template segments);
  it reaches NeMo's ``MaskedTokenLossReduction`` as the batch's ``loss_mask`` unchanged. NeMo 2.7.3's own chat
  path (``ChatDataModule`` / ``_chat_preprocess``) is not used: without a ``{% generation %}`` block in the
  template it sets the mask to all ones and silently trains on the prompt.
- trainer / optimizer / logger / resume: the shared blocks of :mod:`ellama_recipes.engine.blocks`, given
  :class:`SFTMetricsJsonl` writing ``RUN/metrics.jsonl`` rows ``{"stage": "sft", "step", "loss", "lr"}`` plus
  ``val_loss`` on validation steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import nemo_run as run
import torch
from nemo.collections.llm.gpt.data.fine_tuning import FineTuningDataModule

from ellama_recipes.engine import blocks
from ellama_recipes.engine.callbacks import MetricsJsonl, pipeline_group, to_float
from ellama_recipes.io import metrics
from ellama_recipes.io.run_folder import RunFolder


# ------------------------------------------------------------------------------------------------------- data
class CycledExamples(torch.utils.data.Dataset):
    """``num_samples`` items drawn epoch by epoch from ``examples``: each epoch a fresh seeded permutation
    (``shuffle``) or the file order. Deterministic, so a resumed run sees the same samples after ``consumed_samples``."""

    def __init__(self, examples: list[dict], num_samples: int, *, seed: int, shuffle: bool, seq_length: int,
                 pad_id: int) -> None:
        if not examples:
            raise ValueError("no examples")
        self.examples = examples
        self.num_samples = int(num_samples)
        self.seed, self.shuffle = seed, shuffle
        self.seq_length, self.pad_id = seq_length, pad_id
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def __getitem__(self, idx: int) -> dict:
        n = len(self.examples)
        return self.examples[self._order(idx // n)[idx % n]]

    def collate_fn(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        from ellama_recipes.data.chat import collate_sft

        return collate_sft(batch, self.seq_length, self.pad_id)


class SFTDataModule(FineTuningDataModule):
    """``FineTuningDataModule`` (NeMo's sampler, consumed-samples state for resume, dataloaders) over pre-tokenized
    rows: ``train_path`` / ``validation_path`` are the ``train.jsonl`` / ``validation.jsonl`` of
    :func:`ellama_recipes.data.chat.prepare`. Batches: ``tokens``, ``labels``, ``loss_mask`` (assistant tokens),
    ``position_ids``, ``attention_mask`` (:func:`ellama_recipes.data.chat.collate_sft`), padded to ``seq_length``.

    Validation: ``limit_val_batches`` global batches over the held-out rows (cycled in file order when there are
    fewer), so every validation measures the same rows.
    """

    def __init__(self, train_path: str, validation_path: str, seq_length: int = 2048, micro_batch_size: int = 1,
                 global_batch_size: int = 8, pad_id: int = 0, seed: int = 1234, num_workers: int = 0,
                 limit_val_batches: int = 1, tokenizer_from: str | None = None, vocab_size: int = 128256) -> None:
        super().__init__(
            dataset_root=str(Path(train_path).parent),
            seq_length=seq_length,
            tokenizer=None,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            seed=seed,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        self._train_path, self._validation_path = Path(train_path), Path(validation_path)
        self.pad_id = int(pad_id)
        self.limit_val_batches = max(int(limit_val_batches), 1)
        self.tokenizer_from, self.vocab_size = tokenizer_from, vocab_size

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Megatron's "single" sampler (pretraining's), not FineTuningDataModule's "batch" one: every sequence is padded
        # to seq_length already, and the batch sampler's length is in global batches while Lightning counts the
        # micro batches NeMo's step fetches, so after a resume Lightning ended the epoch early, validated at the
        # wrong step and restarted the data (the resumed run diverged from the uninterrupted one).
        self.data_sampler.dataloader_type = "single"

    @property
    def train_path(self) -> Path:
        return self._train_path

    @property
    def validation_path(self) -> Path:
        return self._validation_path

    def _create_dataset(self, path, pack_metadata_path=None, is_test=False, **kwargs):
        from ellama_recipes.data.chat import read_examples

        examples = read_examples(path)
        if is_test:
            n = self.limit_val_batches * self.global_batch_size
            return CycledExamples(examples, n, seed=self.seed, shuffle=False, seq_length=self.seq_length,
                                  pad_id=self.pad_id)
        return CycledExamples(examples, self.max_train_samples or len(examples), seed=self.seed, shuffle=True,
                              seq_length=self.seq_length, pad_id=self.pad_id)

    def train_dataloader(self):
        return self._create_dataloader(self._create_dataset(self.train_path), mode="train")

    def val_dataloader(self):
        # Not FineTuningDataModule._create_dataloader: it records trainer.global_step as ``init_global_step``, the
        # base of the consumed-samples count saved in every checkpoint. Lightning builds the validation loader at
        # the first validation (step val_check_interval), so checkpoints after it would store too few consumed
        # samples and a resumed run would replay data (NeMo 2.7.3). Only the train loader may set it.
        from nemo.lightning.data import WrappedDataLoader

        ds = self._create_dataset(self.validation_path, is_test=True)
        return WrappedDataLoader(mode="validation", dataset=ds, num_workers=self.num_workers,
                                 pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                                 collate_fn=ds.collate_fn)


# ------------------------------------------------------------------------------------------------------- metrics
class SFTMetricsJsonl(MetricsJsonl):
    """``RUN/metrics.jsonl`` rows ``{"stage": "sft", "step", "loss", "lr"}`` (+ ``step_time_s``), and ``val_loss``
    (token-weighted mean over the held-out rows' assistant tokens) merged into the row of the step it ran after.
    Resume handling (dropping rows past the resumed step, resume.json) is :class:`MetricsJsonl`'s."""

    stage = "sft"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.max_steps and step >= trainer.max_steps:
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = True  # see MetricsJsonl.on_train_batch_end
        if trainer.global_rank != 0 or (step % self.log_every and step != trainer.max_steps):
            return
        m = trainer.callback_metrics
        lr = m.get("lr")
        if lr is None and trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
        rec = {"stage": self.stage, "step": int(step), "loss": to_float(m.get("reduced_train_loss")), "lr": to_float(lr)}
        if m.get("grad_norm") is not None:  # before clipping (MegatronStrategy.optimizer_step)
            rec["grad_norm"] = to_float(m.get("grad_norm"))
        if m.get("train_step_timing in s") is not None:
            rec["step_time_s"] = to_float(m.get("train_step_timing in s"))
        metrics.append(self.path, rec)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._losses: list[float] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if getattr(trainer, "sanity_checking", False) or outputs is None:
            return
        value = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(trainer, "sanity_checking", False) or not hasattr(self, "_losses"):
            return
        sums = torch.tensor([sum(self._losses), len(self._losses)], dtype=torch.float64)
        group = pipeline_group()  # only the last stage computes the loss; the others report 0
        if group is not None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else sums.device
            sums = sums.to(dev)
            torch.distributed.all_reduce(sums, group=group)
            sums = sums.cpu()
            sums[1] /= torch.distributed.get_world_size(group)
        if sums[1] <= 0:
            return
        val = float(sums[0] / sums[1])
        pl_module.log("val_loss", val, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if trainer.global_rank == 0:
            step = int(trainer.global_step)
            metrics.merge_step(self.path, step, {"stage": self.stage, "val_loss": val})
            print(f"[ellama] sft step {step}: val_loss={val:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------------- partial
def data_module(cfg) -> run.Config:
    _abs = blocks.abs_path
    s, d = cfg.schedule, cfg.data
    return run.Config(
        SFTDataModule,
        train_path=str(_abs(d.train)),
        validation_path=str(_abs(d.validation)),
        seq_length=s.seq_length,
        micro_batch_size=s.micro_batch_size,
        global_batch_size=s.global_batch_size,
        pad_id=d.pad_id,
        seed=d.seed,
        num_workers=d.num_workers,
        limit_val_batches=s.limit_val_batches,
        tokenizer_from=str(_abs(cfg.checkpoint.restore_from)) if cfg.checkpoint.restore_from else None,
        vocab_size=cfg.model.vocab_size,
    )


def trainer(cfg) -> run.Config:
    """The shared trainer with SFT's metrics callback (one validation set)."""
    metrics_cb = run.Config(SFTMetricsJsonl, path=str(RunFolder.of(cfg).metrics), log_every=cfg.checkpoint.log_every)
    # The validation loader holds exactly schedule.limit_val_batches global batches (SFTDataModule); run all of it.
    # (An int limit would count micro batches: NeMo's dataloader_iter step pulls num_microbatches per step.)
    tr = blocks.trainer(cfg, metrics=metrics_cb, limit_val_batches=1.0)
    return tr


# The SFT loss whose gradient is taken: sum of the assistant tokens' NLL over the GLOBAL batch / their number (TRL's
# SFTTrainer: sum / num_items_in_batch). megatron-core's default (calculate_per_token_loss=False) instead divides
# each micro batch's sum by ITS token count and averages those means over micro batches and DP ranks: every micro
# batch weighs the same whatever its token count, so the update depended on micro_batch_size and the DP size, and
# was not the gradient of the logged loss (NeMo's MaskedTokenLossReduction.reduce logs the global token mean).
# Measured against TRL on the tiny model (issue 22, global batch 8, micro batch 2): grad norm 7.48 vs TRL's 6.04 at
# step 1 before, equal after.
PER_TOKEN_LOSS = True


def finetune(model, data, trainer, log, optim, resume, run_dir: str | None = None, report: dict | None = None):
    """The SFT entry function of every rank: per-rank setup, the checkpoint's tokenizer, then ``llm.finetune``.

    The tokenizer (saved into every checkpoint's context, so ``ellama export-hf`` finds it) is the ``--from``
    checkpoint's; it is read here, after the partial is built (NeMo's ``load_context`` is itself a fiddle build).
    """
    from ellama_recipes.engine.runner import finish_stage, prepare_rank

    prepare_rank(run_dir)
    from nemo.collections import llm

    from ellama_recipes.engine.checkpoint.read import checkpoint_tokenizer

    data.tokenizer = checkpoint_tokenizer(data.tokenizer_from, data.vocab_size)
    result = llm.finetune(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume,
                          peft=None, tokenizer="data")
    finish_stage(trainer, run_dir, report)
    return result


def build_sft_partial(cfg, *, report: dict | None = None) -> run.Partial:
    """The SFT ``run.Partial`` for ``cfg`` (an :class:`ellama_recipes.recipes.sft.SFTConfig`; not validated here):
    :func:`finetune` with the shared blocks, SFT's data module and metrics; checkpoints
    ``RUN/checkpoints/<cfg.run_name>--step=...``; ``report``: the recipe's summary spec for ``RUN/complete.json``."""
    from nemo.collections import llm

    model_cfg = blocks.model_config(cfg)
    model_cfg.calculate_per_token_loss = PER_TOKEN_LOSS
    tr = trainer(cfg)
    # per-token loss: DP ranks SUM their gradients and megatron's finalize_model_grads divides by the all-reduced
    # token count (megatron-core refuses calculate_per_token_loss together with average_in_collective)
    tr.strategy.ddp.average_in_collective = not PER_TOKEN_LOSS
    return blocks.stage_partial(finetune, cfg, model=run.Config(llm.LlamaModel, config=model_cfg),
                                data=data_module(cfg), trainer=tr, report=report)


# ------------------------------------------------------------------------------------------------------- loss probe
@torch.no_grad()
def masked_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """The training loss the engine computes for ``batch`` (one micro batch): the model's own forward step (per
    token cross-entropy against ``labels``) reduced by the model's ``training_loss_reduction``
    (``MaskedTokenLossReduction``: sum(loss x loss_mask) / sum(loss_mask)). Used to prove the masking."""
    from ellama_recipes.engine.checkpoint.parity import cpu_only, mcore_gpt

    gpt = mcore_gpt(model)
    gpt.eval()
    if cpu_only():
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    dev = next(gpt.parameters()).device
    b = {k: v.to(dev) for k, v in batch.items()}
    per_token = gpt(input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                    labels=b["labels"])
    loss_sum, n, _ = model.training_loss_reduction.forward(b, per_token)
    return float(loss_sum / n)


__all__ = ["SFTDataModule", "SFTMetricsJsonl", "build_sft_partial", "finetune", "masked_loss"]
