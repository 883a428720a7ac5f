"""Writing engine checkpoints: the Megatron ``torch_dist`` ``weights/`` folder chunk by chunk, and ``context/``.

:func:`write_engine_weights` hands ``torch.distributed.checkpoint``'s writer a lazy save planner, so each chunk is
produced when the writer reaches it (at most ``workers`` groups in memory); the result is what Megatron's own
``torch_dist`` strategy writes (same keys, layer-stacked tensors as one chunk per layer, gate and up as two, empty
``_extra_state`` objects, ``common.pt``, ``metadata.json``). :func:`write_context` dumps ``context/`` with NeMo's own
io serialisation, so training and resume read the checkpoint unchanged.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ellama_recipes.engine import bridge
from ellama_recipes.engine.bridge import Group
from ellama_recipes.engine.process_env import in_process_model
from ellama_recipes.errors import UserError
from ellama_recipes.model.architecture import SOURCE_CONFIG_NAME

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def have_transformer_engine() -> bool:
    from nemo.collections.llm.gpt.model.base import HAVE_TE

    return bool(HAVE_TE)


def te_free_overrides() -> dict:
    """Config fields that need Transformer Engine / CUDA kernels; turned off only where TE is absent."""
    if have_transformer_engine():
        return {}
    return dict(apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
                bias_activation_fusion=False, masked_softmax_fusion=False, cross_entropy_loss_fusion=False)


def hf_dtype(cfg: dict) -> torch.dtype:
    """The dtype an HF config.json declares (``torch_dtype`` / ``dtype``; float32 when absent)."""
    return TORCH_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), torch.float32)


def _extra_state_bytes() -> io.BytesIO:
    # What megatron's torch_dist strategy stores for a TE-free linear layer's (empty) extra state.
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf


def write_engine_weights(wdir: Path, spec: dict, groups: list[Group], make_chunk: Callable[[Group, int], torch.Tensor],
                         dtypes: Callable[[Group], torch.dtype], workers: int = 1) -> None:
    """Write a Megatron torch_dist ``weights/`` dir, producing each chunk lazily when the writer reaches it."""
    import lightning
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import MCoreMetadata
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    L = spec["num_layers"]
    items, resolve = [], {}
    for g in groups:
        lead = (g.layer,) if g.stacked else ()
        size = torch.Size(((L,) if g.stacked else ()) + g.engine_shape)
        for j, (first, rows, _) in enumerate(bridge.engine_chunks(g)):
            offsets = torch.Size(lead + (first,) + (0,) * (len(g.engine_shape) - 1))
            sizes = torch.Size(((1,) if g.stacked else ()) + (rows,) + g.engine_shape[1:])
            idx = MetadataIndex(g.key, offsets)
            items.append(WriteItem(index=idx, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                properties=TensorProperties(dtype=dtypes(g)), size=size)))
            resolve[idx] = (g, j)
    for i in range(L):
        for mod in bridge.EXTRA_STATE_MODULES:
            idx = MetadataIndex(f"module.decoder.layers.{mod}._extra_state/shard_{i}_{L}")
            items.append(WriteItem(index=idx, type=WriteItemType.BYTE_IO))
    stacked = sorted({g.key for g in groups if g.stacked})

    class LazySavePlanner(DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def create_global_plan(self, all_plans):
            plans, md = super().create_global_plan(all_plans)
            return plans, MCoreMetadata(mcore_data={k: {} for k in stacked}, **vars(md))

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return _extra_state_bytes()
            g, j = resolve[write_item.index]
            t = make_chunk(g, j)
            return t.unsqueeze(0) if g.stacked else t

    wdir.mkdir(parents=True)
    # per_thread_copy_ahead=0: the serial loader everywhere (with CUDA present the default would resolve chunks
    # ahead of writing them); make_chunk relies on each thread's previous chunk being written when it is called.
    writer = dcp.FileSystemWriter(str(wdir), thread_count=max(1, workers), per_thread_copy_ahead=0)
    dcp.save({}, storage_writer=writer, planner=LazySavePlanner(flatten_state_dict=False,
                                                                flatten_sharded_tensors=False), no_dist=True)
    # The non-sharded part megatron's save adds next to the shards (Lightning's checkpoint dict, no weights).
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__, "state_dict": {},
                "loops": {}, "callbacks": {}, "optimizer_states": {}, "lr_schedulers": [],
                "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                                     "distrib_optim_sharding_type": "dp_reshardable"}}, wdir / "common.pt")
    (wdir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))


def write_context(ckpt: Path, hf_dir: Path, cfg: dict, spec: dict) -> None:
    """``context/`` as NeMo's importer writes it: the model (Llama31Config + HF tokenizer) and trainer, serialised
    by NeMo's own io (``TrainerContext.io_dump``), the tokenizer files and the source HF config as artifacts."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.collections.llm.gpt.model.llama import LlamaModel
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.io.pl import TrainerContext
    from transformers import AutoTokenizer as HFAutoTokenizer, GenerationConfig

    dtype = hf_dtype(cfg)
    gen = GenerationConfig.from_pretrained(str(hf_dir)) if (hf_dir / "generation_config.json").is_file() else None
    config = bridge.llama31_config(
        spec, seq_length=spec["max_position_embeddings"], init_method_std=cfg.get("initializer_range", 0.02),
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, params_dtype=dtype, generation_config=gen,
        **te_free_overrides())
    stage = Path(tempfile.mkdtemp(prefix="ellama-tok-")) / "nemo_tokenizer"
    try:
        try:
            HFAutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(stage))
        except Exception as exc:  # noqa: BLE001 - any tokenizer load failure
            raise UserError(f"Cannot load the tokenizer in {hf_dir} with transformers ({type(exc).__name__}: "
                            f"{exc}); an HF Llama directory needs tokenizer.json / tokenizer_config.json.") from exc
        # Export needs max_position_embeddings and the eos id list, which NeMo's config has no place for; the
        # tokenizer dir travels into every checkpoint's context/ (trainer checkpoints too), so it rides there.
        (stage / SOURCE_CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        model = LlamaModel(config, tokenizer=AutoTokenizer(str(stage)))
        with in_process_model():
            trainer = Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                              strategy=MegatronStrategy(ckpt_save_optimizer=False, ckpt_async_save=False))
            trainer.strategy.connect(model)
            TrainerContext.from_trainer(trainer).io_dump(ckpt / "context", yaml_attrs=["model"])
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)
