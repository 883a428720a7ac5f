"""The pretraining data module: the blend from ``manifest.json`` plus per-source validation.

``ellama data build`` writes ``DIR/manifest.json`` (issue 3)::

    {"blend": [w1, "prefix1", w2, "prefix2", ...],            # Megatron list form, weights sum to 1
     "sources": [{"prefix", "side": "domain"|"general", "lang", "documents", "tokens"}, ...],
     "realized": {...}, "rejected": {...}}

Prefixes are relative to the manifest's folder. Training samples come from the whole blend (Megatron's
``BlendedMegatronDatasetBuilder`` over ``GPTDataset``). Validation is per side: one validation dataset built from
the domain prefixes' validation split and one from the general prefixes' validation split, so the domain gain and
the general forgetting are both visible during training (``val_loss_domain`` / ``val_loss_general``).
"""

from __future__ import annotations

import torch
from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

from ellama_recipes.data.manifest import SIDES, load_manifest
from ellama_recipes.engine.checkpoint.read import checkpoint_tokenizer
from ellama_recipes.errors import UserError


class _Deferred:
    """Placeholder tokenizer until :attr:`ManifestDataModule.tokenizer` is first read."""


_DEFERRED = _Deferred()


class ManifestDataModule(PreTrainingDataModule):
    """``PreTrainingDataModule`` over a manifest's blend, with domain / general validation sets.

    ``val_dataloader`` yields ``val_batches_per_side`` global batches from the domain validation set followed by as
    many from the general one (a single Lightning validation loader, so NeMo's Megatron validation step, pipeline
    schedule and loss reduction are used unchanged; the trainer runs the whole loader);
    :class:`ellama_recipes.engine.callbacks.MetricsJsonl` attributes each global batch to its side by index.
    """

    def __init__(
        self,
        manifest: str,
        seq_length: int = 2048,
        micro_batch_size: int = 1,
        global_batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 1234,
        split: str = "990,10,0",
        tokenizer_from: str | None = None,
        vocab_size: int = 128256,
        per_source_validation: bool = True,
        val_batches_per_side: int = 1,
        tokenizer=None,
    ) -> None:
        self.manifest_path = manifest
        self.manifest = load_manifest(manifest)
        self.per_source_validation = per_source_validation
        self.val_batches_per_side = int(val_batches_per_side)
        if per_source_validation:
            missing = [side for side in SIDES if not self.manifest["side_prefixes"][side]]
            if missing:
                raise UserError(
                    f"The data manifest {self.manifest['path']} has no {' and no '.join(missing)} source, so "
                    f"per-source validation (val_loss_domain / val_loss_general) cannot be computed. Fix: build the "
                    f"data with both --domain and --general inputs (`ellama data build`)."
                )
        # The checkpoint's tokenizer is loaded on first use, not here: this constructor runs inside fiddle's
        # build of the recipe and NeMo's load_context is itself an fdl.build (nested builds are forbidden).
        self._tokenizer_from = tokenizer_from if tokenizer is None else None
        self._vocab_size = vocab_size
        # A weight of 0 (allowed by the manifest: e.g. the quickstart's domain-only arm) keeps the source out of
        # training (Megatron's BlendedDataset refuses zero weights) but in its side's validation set.
        train_paths = [x for w, pre in zip(self.manifest["train_blend"][0::2], self.manifest["train_blend"][1::2])
                       if w > 0 for x in (w, pre)]
        super().__init__(
            paths=train_paths,
            seq_length=seq_length,
            tokenizer=tokenizer if tokenizer is not None else _DEFERRED,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            seed=seed,
            split=split,
        )

    @property
    def tokenizer(self):
        tok = self.__dict__.get("_tokenizer")
        if tok is None or isinstance(tok, _Deferred):
            tok = checkpoint_tokenizer(self.__dict__.get("_tokenizer_from"), self.__dict__.get("_vocab_size", 128256))
            self.__dict__["_tokenizer"] = tok
        return tok

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.__dict__["_tokenizer"] = value

    # ------------------------------------------------------------------ per-source validation
    def build(
        self,
        trainer_max_steps: int,
        trainer_val_check_interval: int,
        trainer_limit_val_batches,
        trainer_limit_test_batches,
    ):
        """Train/test from the whole blend (upstream); validation = domain batches then general batches.

        ``val_batches_per_side`` (``schedule.limit_val_batches``) global batches come from the domain prefixes'
        validation split, then as many from the general prefixes' validation split. The validation split of each
        prefix is the same held-out document range (same ``split`` string and seed) that the blended training set
        excludes.
        """
        if not self.per_source_validation:
            super().build(trainer_max_steps, trainer_val_check_interval, trainer_limit_val_batches,
                          trainer_limit_test_batches)
            return
        # upstream sizes its (replaced) validation set from an integer batch count; the trainer runs the whole loader
        super().build(trainer_max_steps, trainer_val_check_interval, 2 * max(self.val_batches_per_side, 1),
                      trainer_limit_test_batches)
        if self.val_batches_per_side < 1:
            raise UserError(f"Per-source validation needs schedule.limit_val_batches >= 1, got "
                            f"{self.val_batches_per_side}.")
        n = self.val_batches_per_side * self.data_sampler.global_batch_size
        sides = {side: self._side_validation(side, n) for side in SIDES}
        self._validation_ds = SideConcatDataset([sides["domain"], sides["general"]], n)

    def _side_validation(self, side: str, num_samples: int):
        import dataclasses

        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

        prefixes = self.manifest["side_prefixes"][side]
        if not prefixes:
            raise UserError(
                f"The data manifest {self.manifest['path']} has no {side} source, so {side} validation loss cannot "
                f"be computed. Fix: build the data with both --domain and --general inputs."
            )
        train_blend = self.manifest["train_blend"]
        weight = {pre: w for w, pre in zip(train_blend[0::2], train_blend[1::2])}
        ws = [weight[p] for p in prefixes]
        if sum(ws) <= 0:  # a side kept out of training (weights 0): validate on it in proportion to its tokens
            from pathlib import Path

            root = Path(self.manifest["path"]).parent
            tokens = {str((root / s["prefix"]).resolve()): float(s.get("tokens") or 0)
                      for s in self.manifest.get("sources", []) if isinstance(s, dict) and "prefix" in s}
            ws = [tokens.get(p, 0.0) for p in prefixes]
            keep = [i for i, w in enumerate(ws) if w > 0] or list(range(len(prefixes)))
            prefixes, ws = [prefixes[i] for i in keep], [ws[i] if ws[i] > 0 else 1.0 for i in keep]
        total = sum(ws)
        blend = (prefixes, [w / total for w in ws] if len(prefixes) > 1 and total > 0 else None)
        config = dataclasses.replace(self.gpt_dataset_config, blend=blend, blend_per_split=None, split=self.split)
        try:
            _, val, _ = BlendedMegatronDatasetBuilder(
                self.dataset_cls, [1, num_samples, 1], is_built_on_rank=lambda: True, config=config
            ).build()
        except (AssertionError, ValueError, IndexError) as exc:
            raise UserError(
                f"Could not build the {side} validation set from {prefixes} with split {self.split!r} ({exc}). "
                f"Fix: give the {side} side more documents or a larger validation share (data.split, e.g. 900,100,0)."
            ) from None
        if val is None or len(val) < 1:
            raise UserError(
                f"The {side} validation split is empty (split {self.split!r}). Fix: give the {side} side more "
                f"documents or a larger validation share (data.split, e.g. 900,100,0)."
            )
        return val


class SideConcatDataset(torch.utils.data.Dataset):
    """``per_side`` samples from each dataset, in order (domain first, then general)."""

    def __init__(self, datasets, per_side: int) -> None:
        self.datasets = list(datasets)
        self.per_side = int(per_side)

    def __len__(self) -> int:
        return self.per_side * len(self.datasets)

    def __getitem__(self, idx: int):
        ds = self.datasets[idx // self.per_side]
        return ds[(idx % self.per_side) % len(ds)]
