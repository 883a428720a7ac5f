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
- trainer / optimizer / logger / resume: the shared blocks of :mod:`ellama_recipes.engine.blocks`, with
  :class:`SFTMetricsJsonl` writing ``RUN/metrics.jsonl`` rows ``{"stage": "sft", "step", "loss", "lr"}`` plus
  ``val_loss`` on validation steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import nemo_run as run
import torch
from nemo.collections.llm.gpt.data.fine_tuning import FineTuningDataModule

from ellama_recipes.engine.callbacks import MetricsJsonl, _append, _num, _pipeline_group, merge_step

RUN_NAME = "sft"


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
        rec = {"stage": self.stage, "step": int(step), "loss": _num(m.get("reduced_train_loss")), "lr": _num(lr)}
        if m.get("train_step_timing in s") is not None:
            rec["step_time_s"] = _num(m.get("train_step_timing in s"))
        _append(self.path, rec)

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
        group = _pipeline_group()  # only the last stage computes the loss; the others report 0
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
            merge_step(self.path, step, {"stage": self.stage, "val_loss": val})
            print(f"[ellama] sft step {step}: val_loss={val:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------------- partial
def data_module(cfg) -> run.Config:
    from ellama_recipes.engine.blocks import _abs

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
    """The shared trainer with the SFT metrics callback in place of pretraining's (one validation set)."""
    from ellama_recipes.engine import blocks

    tr = blocks.trainer(cfg)
    path = str(blocks.RunLayout.of(cfg).metrics)
    callbacks = [c for c in tr.callbacks if getattr(c, "__fn_or_cls__", None) is not MetricsJsonl]
    callbacks.append(run.Config(SFTMetricsJsonl, path=path, log_every=cfg.checkpoint.log_every))
    tr.callbacks = callbacks
    # The validation loader holds exactly schedule.limit_val_batches global batches (SFTDataModule); run all of it.
    # (An int limit would count micro batches: NeMo's dataloader_iter step pulls num_microbatches per step.)
    tr.limit_val_batches = 1.0
    return tr


def finetune(model, data, trainer, log, optim, resume, run_dir: str | None = None):
    """The SFT entry function of every rank: per-rank setup, the checkpoint's tokenizer, then ``llm.finetune``.

    The tokenizer (saved into every checkpoint's context, so ``ellama export-hf`` finds it) is the ``--from``
    checkpoint's; it is read here, after the partial is built (NeMo's ``load_context`` is itself a fiddle build).
    """
    from ellama_recipes.engine.runner import prepare_rank

    prepare_rank(run_dir)
    from nemo.collections import llm

    from ellama_recipes.engine.pretrain_data import load_tokenizer

    data.tokenizer = load_tokenizer(data.tokenizer_from, data.vocab_size)
    result = llm.finetune(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume,
                          peft=None, tokenizer="data")
    if run_dir and trainer.global_rank == 0 and trainer.max_steps and trainer.global_step >= trainer.max_steps:
        write_stage_complete(run_dir, RUN_NAME, int(trainer.max_steps), summarize(run_dir))
    return result


def write_stage_complete(run_dir: str | Path, stage: str, train_steps: int, summary: dict | None = None) -> dict:
    """``RUN/complete.json`` (atomic): the stage trained ``train_steps`` steps; ``checkpoint`` is the newest complete
    one (what ``ellama align`` chains from and skips on re-runs). Every stage's entry function calls it on rank 0
    after training returns, so launched (torchrun / Slurm) runs leave it too."""
    import os

    from ellama_recipes.engine.resume import find_resumable

    run_dir = Path(run_dir)
    ckpt = find_resumable(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"{stage} finished but {run_dir}/checkpoints holds no complete checkpoint")
    rec = {"stage": stage, "train_steps": int(train_steps), "checkpoint": str(Path(ckpt).resolve()),
           "summary": summary or {}}
    tmp = run_dir / "complete.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "complete.json")
    return rec


def build_sft_partial(cfg) -> run.Partial:
    """The SFT ``run.Partial`` for ``cfg`` (an :class:`ellama_recipes.recipes.sft.SFTConfig`; not validated here)."""
    from nemo.collections import llm

    from ellama_recipes.engine import blocks

    return run.Partial(
        finetune,
        model=run.Config(llm.LlamaModel, config=blocks.model_config(cfg)),
        data=data_module(cfg),
        trainer=trainer(cfg),
        log=blocks.logger(cfg, RUN_NAME),
        optim=blocks.optimizer(cfg),
        resume=blocks.resume(cfg),
        run_dir=str(blocks.RunLayout.of(cfg).root),
    )


# ------------------------------------------------------------------------------------------------------- loss probe
@torch.no_grad()
def masked_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """The training loss the engine computes for ``batch`` (one micro batch): the model's own forward step (per
    token cross-entropy against ``labels``) reduced by the model's ``training_loss_reduction``
    (``MaskedTokenLossReduction``: sum(loss x loss_mask) / sum(loss_mask)). Used to prove the masking."""
    from ellama_recipes.engine.convert import _cpu_only, _mcore_gpt

    gpt = _mcore_gpt(model)
    gpt.eval()
    if _cpu_only():
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    dev = next(gpt.parameters()).device
    b = {k: v.to(dev) for k, v in batch.items()}
    per_token = gpt(input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                    labels=b["labels"])
    loss_sum, n, _ = model.training_loss_reduction.forward(b, per_token)
    return float(loss_sum / n)


def summarize(out: str | Path) -> dict[str, Any]:
    """Summary of an SFT run folder from its metrics.jsonl and resume record."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    train = [r for r in recs if r.get("loss") is not None]
    val = [r for r in recs if r.get("val_loss") is not None]
    resumed = out / "resume.json"
    return {
        "stage": "sft",
        "final_step": train[-1]["step"] if train else None,
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "first_val_loss": val[0]["val_loss"] if val else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "resumed_from": json.loads(resumed.read_text()).get("resumed_from") if resumed.exists() else None,
        "out_dir": str(out),
        "metrics": str(metrics),
    }


__all__ = ["RUN_NAME", "SFTDataModule", "SFTMetricsJsonl", "build_sft_partial", "finetune", "masked_loss", "summarize",
           "write_stage_complete"]
