"""DPO's data: tokenized preference pairs, their seeded epoch order, the interleaved micro batches, the data module.

The dataset item is a PAIR; a micro batch of ``m`` pairs is collated into ``2m`` sequences interleaved
``[c0, r0, c1, r1, ...]`` and the Megatron step runs with micro batch size ``2m`` (:class:`PairDataSampler`), so a pair
never spans two micro batches and the pipeline sends ``[seq, 2m, hidden]`` tensors between stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from nemo.lightning import io
from nemo.lightning.pytorch.plugins import MegatronDataSampler

from ellama_recipes.errors import UserError


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
            from ellama_recipes.engine.checkpoint.read import checkpoint_tokenizer

            tok = checkpoint_tokenizer(self.__dict__.get("_tokenizer_from"), 0)
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
