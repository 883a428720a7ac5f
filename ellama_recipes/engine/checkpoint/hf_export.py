"""Engine checkpoint -> HF Llama 3.1 directory, streamed chunk by chunk, then verified (``ellama export-hf``).

The checkpoint is read chunk by chunk (:class:`ellama_recipes.engine.checkpoint.read.EngineChunks`; the model is
never instantiated) into safetensors shards whose headers are known up front
(:class:`ellama_recipes.io.safetensors.SafetensorsShards`). With one worker the next group is read in a second thread
while the current one is converted, written and verified. ``config.json`` is the source's with the checkpoint's
architecture; the tokenizer files are the ones the importer staged verbatim (chat template intact).

What NeMo 2.7.3's own exporter gets wrong: under the TE-free layer spec it crashes on the RMSNorm weights, and it
loads the whole model (export peaks at ~4.4x the model's bytes: 3 TB of host memory for 405B).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ellama_recipes.engine import bridge
from ellama_recipes.engine.bridge import Group
from ellama_recipes.engine.checkpoint.read import EngineChunks, dcp_reader, engine_shapes
from ellama_recipes.engine.checkpoint.verify import (
    Progress, TensorCheck, VerifyReport, map_loaded, unmapped, verify_group, verify_groups,
)
from ellama_recipes.engine.checkpoint.write import te_free_overrides
from ellama_recipes.errors import UserError
from ellama_recipes.io.safetensors import DEFAULT_SHARD_BYTES, Buffers, HFWeights, SafetensorsShards
from ellama_recipes.model import architecture
from ellama_recipes.model.architecture import SOURCE_CONFIG_NAME


def load_model_context(ckpt: Path, subpath: str = "model"):
    """Build the checkpoint's saved model (or sub-object) with TE-only fusions turned off where TE is absent."""
    import fiddle as fdl
    from nemo.lightning.io.api import load_context

    try:
        cfg = load_context(Path(ckpt), subpath=subpath, build=False)
    except Exception as exc:  # noqa: BLE001 - fiddle/yaml/io errors all mean "unreadable context"
        raise UserError(
            f"Cannot read {ckpt}/context ({type(exc).__name__}: {exc}); the checkpoint is partial or corrupt."
        ) from exc
    overrides = te_free_overrides()
    target = cfg.config if subpath == "model" else cfg
    if overrides and subpath in ("model", "model.config"):
        for k, v in overrides.items():
            setattr(target, k, v)
    return fdl.build(cfg)


@dataclass
class ExportPlan:
    ckpt: Path
    spec: dict
    groups: list[Group]
    dtype: torch.dtype
    config: Any  # the saved Llama31Config
    tokenizer_dir: Path

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * self.dtype.itemsize for g in self.groups for s in g.hf_shapes)


def plan_export(ckpt: Path) -> ExportPlan:
    """Config, tokenizer and tensor groups of an engine checkpoint, checked against its metadata (no tensor read)."""
    ckpt = Path(ckpt)
    config = load_model_context(ckpt, "model.config")
    tok = load_model_context(ckpt, "model.tokenizer")
    hf_tok = getattr(tok, "tokenizer", None)
    if not hasattr(hf_tok, "save_pretrained"):
        raise UserError(
            f"{ckpt} carries a {type(tok).__name__}, not a Hugging Face tokenizer, so an export would have no "
            "tokenizer files (a run started without --from?). Export runs that continued from `ellama import-hf`."
        )
    if getattr(config, "num_moe_experts", None) or getattr(config, "add_bias_linear", False) or \
            getattr(config, "add_qkv_bias", False):
        raise UserError(f"{ckpt} is not a Llama-3.1-architecture model (MoE or linear biases); it has no HF "
                        "Llama equivalent.")
    tok_dir = Path(getattr(hf_tok, "name_or_path", "") or "/nonexistent")
    source = json.loads((tok_dir / SOURCE_CONFIG_NAME).read_text()) if (tok_dir / SOURCE_CONFIG_NAME).is_file() \
        else None
    spec = architecture.from_nemo(config, source)
    spec.setdefault("max_position_embeddings", config.seq_length)
    _, meta = dcp_reader(ckpt / "weights")
    shapes = engine_shapes(meta)
    rows = shapes.get("embedding.word_embeddings.weight", ([spec["vocab_size"]],))[0][0]
    groups = bridge.expand(spec, vocab_rows=rows)
    check_engine_shapes(shapes, spec, groups, where=ckpt)
    return ExportPlan(ckpt, spec, groups, config.params_dtype, config, tok_dir)


def check_engine_shapes(shapes: dict[str, tuple[list[int], str]], spec: dict, groups: list[Group], *,
                        where: Path) -> None:
    """Every tensor the table expects is in the checkpoint with the right shape, and nothing else is."""
    want: dict[str, tuple[tuple[int, ...], bool]] = {}
    for g in groups:
        k = g.key[len("module."):]
        want[k] = (((spec["num_layers"],) if g.stacked else ()) + g.engine_shape, g.row.kind == "vocab")
    problems = []
    for k, (shp, vocab) in want.items():
        if k not in shapes:
            problems.append(f"{k}: missing from the checkpoint")
            continue
        got = shapes[k][0]
        if vocab:  # Megatron may pad rows, never fewer than the tokenizer's
            if len(got) != 2 or got[1] != shp[1] or got[0] < spec["vocab_size"]:
                problems.append(f"{k}: shape {got}, expected [>= {spec['vocab_size']}, {shp[1]}]")
        elif got != list(shp):
            problems.append(f"{k}: shape {got}, expected {list(shp)} from the checkpoint's config")
    if problems:
        raise UserError(
            f"{where} does not hold a complete Llama model matching its own config ({spec['num_layers']} layers, "
            f"hidden {spec['hidden_size']}, {spec['num_attention_heads']} heads / {spec['num_query_groups']} KV "
            f"groups, vocab {spec['vocab_size']}); exporting it would drop or misplace tensors. Use an intact "
            "checkpoint.", problems=problems)
    unmapped = sorted(set(shapes) - set(want))
    if unmapped:
        raise UserError(
            f"{len(unmapped)} engine tensor(s) have no Hugging Face Llama counterpart, so exporting would drop "
            "them. Is this a Llama-3.1-architecture checkpoint (no biases, no MoE, no extra adapters)? "
            "Merge adapters first or export with the tool that produced these weights.", problems=unmapped[:50])


def export_mapping_table(ckpt: Path) -> list[dict]:
    """The dry-run table: engine name -> HF name, shape, dtype (from checkpoint metadata; no tensors loaded)."""
    plan = plan_export(ckpt)
    dt = str(plan.dtype).replace("torch.", "")
    return [{"engine": g.megatron, "hf": h, "engine_shape": list(g.engine_shape), "shape": list(s), "dtype": dt}
            for g in plan.groups for h, s in zip(g.hf, g.hf_shapes)]


def write_hf_config(plan: ExportPlan, out: Path) -> None:
    """config.json (the source's, with the architecture from the checkpoint), generation_config.json, tokenizer."""
    from transformers import GenerationConfig, LlamaConfig

    source = json.loads((plan.tokenizer_dir / SOURCE_CONFIG_NAME).read_text()) \
        if (plan.tokenizer_dir / SOURCE_CONFIG_NAME).is_file() else {}
    fields = {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    fields.update(architecture.to_hf(plan.spec))
    fields["dtype"] = str(plan.dtype).replace("torch.", "")
    cfg = LlamaConfig(**fields)
    cfg.save_pretrained(str(out))
    gen = getattr(plan.config, "generation_config", None) or GenerationConfig.from_model_config(cfg)
    gen.save_pretrained(str(out))
    if (plan.tokenizer_dir / "tokenizer_config.json").is_file():
        # The files the importer staged verbatim from the HF source (special tokens, chat template intact)
        for f in plan.tokenizer_dir.iterdir():
            if f.is_file() and f.name != SOURCE_CONFIG_NAME:
                shutil.copy2(f, out / f.name)
    else:
        load_model_context(plan.ckpt, "model.tokenizer").tokenizer.save_pretrained(str(out))


def export_engine_to_hf(ckpt: Path, out: Path, *, workers: int = 1, shard_bytes: int = DEFAULT_SHARD_BYTES,
                        progress: Progress | None = None, verify_progress: Progress | None = None,
                        plan: ExportPlan | None = None) -> VerifyReport:
    """Stream an engine checkpoint into the existing empty dir ``out`` as an HF Llama and verify every tensor."""
    plan = plan or plan_export(ckpt)
    wdir = Path(ckpt) / "weights"
    shards = SafetensorsShards(Path(out), [(h, s, plan.dtype) for g in plan.groups for h, s in zip(g.hf, g.hf_shapes)],
                               shard_bytes)

    written = HFWeights(Path(out))  # the headers are on disk already
    reader, buffers = EngineChunks(wdir), Buffers()

    def one(g: Group, engine: torch.Tensor) -> list[TensorCheck]:
        for name, t in zip(g.hf, bridge.to_hf(g, engine, plan.spec, plan.dtype)):
            shards.write(name, t)
            if progress:
                progress(t.numel() * t.dtype.itemsize)
            del t
        # read back what was just written and check it against the same engine tensor, split independently
        checks = verify_group(g, engine, written, plan.spec, "export", verify_progress, buffers)
        buffers.give(engine)
        return checks

    checks = map_loaded(one, lambda g: reader.group(g, buffers), plan.groups, workers)
    shards.finish()
    write_hf_config(plan, Path(out))
    return VerifyReport([c for cs in checks for c in cs] + unmapped(HFWeights(Path(out)), plan.groups))


def verify_export_tensors(ckpt: Path, hf_dir: Path) -> VerifyReport:
    """Every engine tensor maps to exactly one HF tensor, bit-exact; no HF tensor without an engine source."""
    plan = plan_export(ckpt)
    return verify_groups(Path(ckpt) / "weights", HFWeights(hf_dir), plan.spec, plan.groups, "export")
