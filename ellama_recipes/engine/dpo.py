"""DPO (direct preference optimisation) on the NeMo 2 / megatron-core engine.

No NeMo 2.x release ships DPO (NeMo-Aligner is NeMo 1.x; NeMo-RL needs Ray + CUDA), so this module builds it from
the same parts pretraining uses: NeMo's ``llm.train`` with ``nl.Trainer`` + ``nl.MegatronStrategy`` (TP / PP / VPP /
DP, distributed optimizer), megatron-core's pipeline schedules and vocab-parallel cross entropy, NeMo's
checkpointing and :class:`~ellama_recipes.engine.resume.SafeAutoResume`. The references read were NeMo-Aligner's
``megatron_gpt_dpo_model.py`` (loss, chosen/rejected in one batch, summed response log-probs) and TRL's
``dpo_trainer.py`` (``sigmoid`` loss, the logged rewards / accuracies / margins).

Loss, per preference pair (``pi`` = policy, ``ref`` = frozen reference = the SFT result; each term is the SUM of
the log-probs of the pair's response tokens only, prompt and padding masked)::

    dpo  = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    nll  = mean over the chosen response tokens of -log pi(token)         (Llama 3: NLL on chosen, weight 0.2)
    loss = dpo + sft_loss_weight * nll                                   averaged over the pairs of the global batch

Logged like TRL: ``rewards_chosen = beta * (pi_c - ref_c)``, ``rewards_rejected = beta * (pi_r - ref_r)`` (means),
``reward_accuracy`` = share of pairs with ``rewards_chosen > rewards_rejected``, ``margin`` = mean of their
difference.

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
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from nemo.collections import llm
from nemo.lightning import io
from nemo.lightning.megatron_parallel import MegatronLossReduction
from nemo.lightning.pytorch.plugins import MegatronDataSampler

from ellama_recipes.engine.callbacks import MetricsJsonl, _append, _num, merge_step
from ellama_recipes.errors import UserError

REFERENCE_FILE = "reference_logps.pt"
METRIC_KEYS = ("loss", "dpo_loss", "nll_loss", "reward_accuracy", "rewards_chosen", "rewards_rejected", "margin")


# ============================================================================================== math
def sequence_logps(token_nll: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum of response-token log-probs, number of response tokens) from per-token NLL ``[b, s]``."""
    mask = loss_mask.to(token_nll.dtype)
    return -(token_nll.float() * mask.float()).sum(-1), mask.float().sum(-1)


def dpo_terms(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    nll_c: torch.Tensor,
    *,
    beta: float,
    sft_loss_weight: float,
) -> dict[str, torch.Tensor]:
    """Per-pair DPO quantities (vectors over pairs): ``loss``, ``dpo_loss``, ``nll_loss``, ``rewards_chosen``,
    ``rewards_rejected``, ``margin``, ``reward_accuracy`` (see the module docstring for the formulas)."""
    rc = beta * (pi_c - ref_c)
    rr = beta * (pi_r - ref_r)
    dpo = -F.logsigmoid(rc - rr)
    return {
        "loss": dpo + sft_loss_weight * nll_c,
        "dpo_loss": dpo,
        "nll_loss": nll_c,
        "rewards_chosen": rc,
        "rewards_rejected": rr,
        "margin": rc - rr,
        "reward_accuracy": (rc > rr).float(),
    }


# ============================================================================================== data
def read_pairs(path: str | Path) -> list[dict[str, list[int]]]:
    """Tokenized pairs (``chosen_ids``, ``chosen_mask``, ``rejected_ids``, ``rejected_mask``) from a JSONL file
    written by :func:`ellama_recipes.data.chat.prepare` (``kind="preference"``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"Preference data {p} does not exist. Fix: prepare it with `ellama align` (it writes RUN2/dpo/data/)."
        )
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pair = {k: [int(x) for x in row[k]] for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise UserError(
                    f"{p}:{n} is not a tokenized preference pair ({type(exc).__name__}: {exc}). Fix: re-create the "
                    "data with `ellama align` (ellama_recipes.data.chat.prepare)."
                ) from None
            out.append(pair)
    return out


class PairDataset(torch.utils.data.Dataset):
    """``num_samples`` pair indices drawn epoch by epoch from ``pairs`` (a fresh seeded permutation per epoch when
    ``shuffle``), so sample ``i`` is the same pair on every run: resuming from ``consumed_samples`` is exact."""

    def __init__(self, pairs: list[dict], num_samples: int, *, seed: int = 1234, shuffle: bool = True, offset: int = 0):
        if not pairs:
            raise UserError("No preference pairs to train on. Fix: check the preference data (see its rejects file).")
        self.pairs, self.num_samples, self.seed, self.shuffle = pairs, int(num_samples), int(seed), shuffle
        self.offset = int(offset)  # index of pairs[0] in the reference table
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def pair_index(self, i: int) -> int:
        n = len(self.pairs)
        epoch, j = divmod(int(i), n)
        if not self.shuffle:
            return j
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(n, generator=g).tolist()
        return self._perms[epoch][j]

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self.pair_index(i)
        return {**self.pairs[k], "pair_index": self.offset + k}


def collate_pairs(items: list[dict], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A micro batch of ``m`` pairs -> ``2m`` Megatron GPT rows interleaved ``[c0, r0, c1, r1, ...]`` (tokens, labels,
    loss_mask on the response tokens, position_ids, causal attention_mask) plus ``pair_index`` ``[m]``."""
    from ellama_recipes.data.chat import collate_sft, pair_examples

    rows = [ex for it in items for ex in pair_examples(it)]
    batch = collate_sft(rows, seq_length, pad_id)
    batch["pair_index"] = torch.tensor([int(it["pair_index"]) for it in items], dtype=torch.long)
    return batch


class PairDataSampler(MegatronDataSampler):
    """NeMo's Megatron data sampler counted in PAIRS (micro / global batch sizes, consumed samples), whose Megatron
    step runs on ``2 x micro_batch_size`` sequences: the interleaved chosen/rejected rows of one micro batch."""

    def on_megatron_step_start(self, step):
        step = super().on_megatron_step_start(step)
        import dataclasses

        return dataclasses.replace(step, micro_batch_size=2 * self.micro_batch_size)


class _Deferred:
    pass


class PreferenceDataModule(pl.LightningDataModule, io.IOMixin):
    """Train / held-out preference pairs from ``data_dir/{train,validation}.jsonl`` (``prepare`` output).

    Batch sizes count pairs. Training draws ``max_steps x global_batch_size`` samples (:class:`PairDataset`);
    validation runs over the first ``limit_val_batches x global_batch_size`` held-out pairs, in order, every time.
    The reference table indexes train pairs first, then held-out pairs (``pair_index``).
    """

    def __init__(
        self,
        data_dir: str,
        seq_length: int = 2048,
        micro_batch_size: int = 1,
        global_batch_size: int = 8,
        seed: int = 1234,
        num_workers: int = 0,
        tokenizer_from: str | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.seq_length, self.seed, self.num_workers = int(seq_length), int(seed), int(num_workers)
        self.micro_batch_size, self.global_batch_size = int(micro_batch_size), int(global_batch_size)
        self.train_pairs = read_pairs(Path(data_dir) / "train.jsonl")
        self.val_pairs = read_pairs(Path(data_dir) / "validation.jsonl")
        if not self.val_pairs:
            raise UserError(f"{data_dir}/validation.jsonl has no held-out pairs. Fix: keep a validation split.")
        self._tokenizer_from = tokenizer_from
        self._pad_id = pad_id
        self.data_sampler = PairDataSampler(
            seq_len=self.seq_length, micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size
        )

    @property
    def all_pairs(self) -> list[dict]:
        """Every pair in reference-table order (train, then held out)."""
        return self.train_pairs + self.val_pairs

    @property
    def tokenizer(self):
        tok = self.__dict__.get("_tokenizer")
        if tok is None:
            from ellama_recipes.engine.pretrain_data import load_tokenizer

            tok = load_tokenizer(self.__dict__.get("_tokenizer_from"), 0)
            self.__dict__["_tokenizer"] = tok
        return tok

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.__dict__["_tokenizer"] = value

    @property
    def pad_id(self) -> int:
        if self._pad_id is not None:
            return int(self._pad_id)
        tok = self.tokenizer
        for name in ("pad_id", "eos_id"):
            v = getattr(tok, name, None)
            if isinstance(v, int) and v >= 0:
                return v
        return 0

    def setup(self, stage: str = "") -> None:
        steps = int(self.trainer.max_steps) if getattr(self, "trainer", None) is not None else 1
        self._train_ds = PairDataset(self.train_pairs, max(steps, 1) * self.global_batch_size, seed=self.seed)
        n_val = (len(self.val_pairs) // self.global_batch_size) * self.global_batch_size
        if n_val == 0:
            raise UserError(
                f"{len(self.val_pairs)} held-out pairs are fewer than one global batch ({self.global_batch_size} "
                "pairs). Fix: hold out more pairs or lower schedule.global_batch_size."
            )
        self._val_ds = PairDataset(self.val_pairs, n_val, shuffle=False, offset=len(self.train_pairs))

    def _loader(self, ds, mode: str):
        from functools import partial

        from nemo.lightning.data import WrappedDataLoader

        if getattr(self, "trainer", None) is not None:
            self.data_sampler.init_global_step = self.trainer.global_step
        return WrappedDataLoader(
            mode=mode,
            dataset=ds,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            collate_fn=partial(collate_pairs, seq_length=self.seq_length, pad_id=self.pad_id),
        )

    def train_dataloader(self):
        return self._loader(self._train_ds, "train")

    def val_dataloader(self):
        return self._loader(self._val_ds, "validation")

    # resume: where the sampler restarts (same as NeMo's PreTrainingDataModule)
    def state_dict(self) -> dict[str, Any]:
        consumed = self.data_sampler.compute_consumed_samples(self.trainer.global_step - self.data_sampler.init_global_step)
        return {"consumed_samples": consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from megatron.core.num_microbatches_calculator import update_num_microbatches

        consumed = state_dict["consumed_samples"]
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        update_num_microbatches(consumed_samples=consumed, consistency_check=False)
        self.data_sampler.if_first_step = 1


# ============================================================================================== loss
class DPOLossReduction(MegatronLossReduction):
    """Megatron loss reduction for interleaved pair micro batches (``forward_out`` = per-token NLL ``[2m, s]``).

    ``forward`` returns the micro batch's mean pair loss (megatron divides by the number of micro batches, DDP
    averages over DP: the global-batch mean) and per-metric sums; ``reduce`` all-reduces the sums over DP and keeps
    the global-batch means in :attr:`last` (validation: accumulated in :attr:`val_sums` until read).
    """

    def __init__(self, model: "DPOLlamaModel", validation: bool = False) -> None:
        super().__init__()
        self.beta = float(model.beta)
        self.sft_loss_weight = float(model.sft_loss_weight)
        self.validation = validation
        self.last: dict[str, float] = {}
        self.val_sums: torch.Tensor | None = None

    def forward(self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor):
        logps, n_tok = sequence_logps(forward_out, batch["loss_mask"])
        pi_c, pi_r = logps[0::2], logps[1::2]
        nll_c = -pi_c / n_tok[0::2].clamp(min=1)
        terms = dpo_terms(
            pi_c, pi_r, batch["ref_chosen"].to(pi_c), batch["ref_rejected"].to(pi_r), nll_c,
            beta=self.beta, sft_loss_weight=self.sft_loss_weight,
        )
        loss = terms["loss"].mean()
        sums = torch.stack([torch.tensor(float(pi_c.numel()), device=loss.device)]
                           + [terms[k].detach().sum() for k in METRIC_KEYS])
        return loss, {"dpo_sums": sums}

    def reduce(self, losses_reduced_per_micro_batch) -> torch.Tensor:
        from megatron.core import parallel_state

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if not losses_reduced_per_micro_batch:
            return torch.tensor(0.0, device=dev)
        sums = torch.stack([x["dpo_sums"] for x in losses_reduced_per_micro_batch]).sum(0).to(dev, torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if self.validation:
            self.val_sums = sums.cpu() if self.val_sums is None else self.val_sums + sums.cpu()
        means = sums[1:] / sums[0].clamp(min=1)
        self.last = {k: float(v) for k, v in zip(METRIC_KEYS, means.tolist())}
        return means[0].to(torch.float32)


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
            tmp = self.path.with_name(self.path.name + ".tmp")
            torch.save({"logps": table, "fingerprint": fp, "pairs": len(pairs), "reference": self.reference}, tmp)
            os.replace(tmp, self.path)
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
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        rec: dict[str, Any] = {"stage": self.stage, "step": int(step)}
        rec.update({k: float(v) for k, v in zip(METRIC_KEYS, vec.tolist())})
        rec["lr"] = _num(lr)
        step_time = trainer.callback_metrics.get("train_step_timing in s")
        if step_time is not None:
            rec["step_time_s"] = _num(step_time)
        _append(self.path, rec)

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
        merge_step(self.path, step, vals)
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
def dpo(model, data, trainer, log, optim, resume, run_dir: str | None = None):
    """The DPO entry function of every rank: per-rank setup, ``llm.train`` (tokenizer from the data module, i.e.
    the ``--from`` checkpoint's), then ``RUN/complete.json`` on rank 0 when all steps are done."""
    from ellama_recipes.engine.sft import write_stage_complete
    from ellama_recipes.engine.runner import prepare_rank

    prepare_rank(run_dir)
    result = llm.train(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume,
                       tokenizer="data")
    if run_dir and trainer.global_rank == 0 and trainer.max_steps and trainer.global_step >= trainer.max_steps:
        write_stage_complete(run_dir, "dpo", int(trainer.max_steps), summarize(run_dir))
    return result


def summarize(out: str | Path) -> dict[str, Any]:
    """Summary of a DPO run folder: the last step's training metrics, the first and last held-out validation."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    train = [r for r in recs if r.get("loss") is not None]
    val = [r for r in recs if r.get("val_reward_accuracy") is not None]
    resumed = out / "resume.json"
    last = train[-1] if train else {}
    return {
        "stage": "dpo",
        "final_step": last.get("step"),
        "final_loss": last.get("loss"),
        "final_dpo_loss": last.get("dpo_loss"),
        "first_dpo_loss": train[0].get("dpo_loss") if train else None,
        "val_reward_accuracy": val[-1]["val_reward_accuracy"] if val else None,
        "val_margin": val[-1].get("val_margin") if val else None,
        "first_val_margin": val[0].get("val_margin") if val else None,
        "resumed_from": json.loads(resumed.read_text()).get("resumed_from") if resumed.exists() else None,
        "out_dir": str(out),
        "metrics": str(metrics),
    }


def build_dpo_partial(cfg) -> Any:
    """The DPO ``run.Partial`` for a :class:`ellama_recipes.recipes.dpo.DPOConfig` (not validated here).

    Shared engine blocks (:mod:`ellama_recipes.engine.blocks`): model config, trainer (strategy, precision),
    optimizer, logger (checkpoints ``RUN/checkpoints/dpo--step=...``), safe resume; DPO's own: the model class,
    the pair data module, the reference pass and the DPO metrics callback.
    """
    import nemo_run as run

    from ellama_recipes.engine import blocks as nr

    layout = nr.RunLayout.of(cfg)
    s, d = cfg.schedule, cfg.data
    src = str(nr._abs(cfg.checkpoint.restore_from)) if cfg.checkpoint.restore_from else None
    tr = nr.trainer(cfg, callbacks=[run.Config(ReferenceLogps, path=str(layout.root / REFERENCE_FILE), reference=src)])
    tr.callbacks = [c for c in tr.callbacks if getattr(c, "__fn_or_cls__", None) is not MetricsJsonl]
    tr.callbacks.insert(1, run.Config(DPOMetricsJsonl, path=str(layout.metrics), log_every=cfg.checkpoint.log_every))
    # Lightning counts validation "batches" as items fetched from the loader (micro batches here, the step pulls
    # num_microbatches of them): 1.0 = the whole held-out loader, which holds exactly cfg.val_batches() global batches.
    tr.limit_val_batches = 1.0
    tr.limit_test_batches = 1
    return run.Partial(
        dpo,
        model=run.Config(DPOLlamaModel, config=nr.model_config(cfg), beta=cfg.loss.beta,
                         sft_loss_weight=cfg.loss.sft_loss_weight),
        data=run.Config(
            PreferenceDataModule,
            data_dir=str(nr._abs(d.data_dir)) if d.data_dir else "",
            seq_length=s.seq_length,
            micro_batch_size=s.micro_batch_size,
            global_batch_size=s.global_batch_size,
            seed=d.seed,
            num_workers=d.num_workers,
            tokenizer_from=src,
        ),
        trainer=tr,
        log=nr.logger(cfg, "dpo"),
        optim=nr.optimizer(cfg),
        resume=nr.resume(cfg),
        run_dir=str(layout.root),
    )
