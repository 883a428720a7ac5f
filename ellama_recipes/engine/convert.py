"""HF Llama 3.1 <-> NeMo 2 engine checkpoints, with independent verification.

NeMo's connectors (``HFLlamaImporter`` / ``HFLlamaExporter`` in nemo.collections.llm.gpt.model.llama) do the
conversion; this module fixes what they get wrong and then checks their output with its own, explicit mapping:

* Layer-norm names. NeMo's Llama mapping targets Transformer Engine's fused names
  (``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``). Under the TE-free local layer spec (CPU)
  the model has ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` instead, so NeMo 2.7.3 silently leaves
  the per-layer RMSNorms at their init value of 1.0 on import and crashes on export. Here the mapping is chosen
  from the keys the model actually has, so both specs work.
* RoPE scaling. NeMo's importer reads only ``rope_scaling.factor``; low/high frequency factors and
  ``original_max_position_embeddings`` fall back to Llama 3.1 8B's values. Here the whole config comes from the
  HF config, so any Llama-3.1-architecture shape imports faithfully.
* Tokenizer staging. NeMo stages tokenizer files in the fixed path /tmp/nemo_tokenizer (races between
  concurrent imports); here a private temp dir is used.

Verification reads the engine checkpoint's ``weights/`` directory with plain ``torch.distributed.checkpoint``
(not through NeMo), undoes the QKV interleaving and gate/up fusion with its own code, and compares each tensor
with the HF source bit for bit.

Only modules under ellama_recipes/engine/ import nemo / megatron.core.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch

from ellama_recipes.errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# The explicit Llama mapping (engine name -> HF names) used for verification.
# ----------------------------------------------------------------------------------------------------------------

# Engine per-layer names under the two layer specs (TE fused, local).
TE_NORM_NAMES = {
    "input": "self_attention.linear_qkv.layer_norm_weight",
    "post_attention": "mlp.linear_fc1.layer_norm_weight",
}
LOCAL_NORM_NAMES = {
    "input": "input_layernorm.weight",
    "post_attention": "pre_mlp_layernorm.weight",
}


@dataclass
class Shape:
    """What verification needs to know about the architecture."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # tokenizer / HF vocab
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def split_qkv(qkv: torch.Tensor, s: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's interleaved QKV [(heads_per_group + 2) * groups * head_dim, hidden] -> HF q, k, v."""
    hpg = s.num_attention_heads // s.num_query_groups
    x = qkv.reshape(s.num_query_groups, hpg + 2, s.head_dim, qkv.shape[-1])
    q = x[:, :hpg].reshape(s.num_attention_heads * s.head_dim, -1)
    k = x[:, hpg].reshape(s.num_query_groups * s.head_dim, -1)
    v = x[:, hpg + 1].reshape(s.num_query_groups * s.head_dim, -1)
    return q, k, v


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's fused SwiGLU fc1 = cat([gate, up]) -> HF gate_proj, up_proj."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def engine_to_hf_table(engine_keys: Iterable[str], s: Shape) -> dict[str, list[str]]:
    """engine tensor name -> the HF tensor names it becomes (per layer, unstacked engine names).

    Raises UserError listing engine tensors that have no HF counterpart.
    """
    table: dict[str, list[str]] = {}
    unmapped: list[str] = []
    for key in engine_keys:
        hf = _hf_names_for(key)
        if hf is None:
            unmapped.append(key)
        else:
            table[key] = hf
    if unmapped:
        raise UserError(
            f"{len(unmapped)} engine tensor(s) have no Hugging Face Llama counterpart, so exporting would drop "
            "them. Is this a Llama-3.1-architecture checkpoint (no biases, no MoE, no extra adapters)? "
            "Merge adapters first or export with the tool that produced these weights.",
            problems=sorted(unmapped)[:50],
        )
    if s.tie_word_embeddings:
        table.pop("output_layer.weight", None)
    return table


def _hf_names_for(key: str) -> list[str] | None:
    fixed = {
        "embedding.word_embeddings.weight": ["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": ["model.norm.weight"],
        "output_layer.weight": ["lm_head.weight"],
    }
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "decoder" or parts[1] != "layers" or not parts[2].isdigit():
        return None
    i, rest = parts[2], ".".join(parts[3:])
    p = f"model.layers.{i}."
    per_layer = {
        "self_attention.linear_qkv.weight": [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                             p + "self_attn.v_proj.weight"],
        "self_attention.linear_proj.weight": [p + "self_attn.o_proj.weight"],
        "mlp.linear_fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "mlp.linear_fc2.weight": [p + "mlp.down_proj.weight"],
        TE_NORM_NAMES["input"]: [p + "input_layernorm.weight"],
        LOCAL_NORM_NAMES["input"]: [p + "input_layernorm.weight"],
        TE_NORM_NAMES["post_attention"]: [p + "post_attention_layernorm.weight"],
        LOCAL_NORM_NAMES["post_attention"]: [p + "post_attention_layernorm.weight"],
    }
    return per_layer.get(rest)


def engine_tensors_as_hf(engine: dict[str, torch.Tensor], s: Shape) -> tuple[dict[str, torch.Tensor], dict]:
    """Apply the inverse transforms: engine state (unstacked) -> {hf_name: tensor}, plus the mapping table.

    Duplicate targets (two engine tensors claiming one HF name) are an error.
    """
    table = engine_to_hf_table(engine.keys(), s)
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    dups: list[str] = []
    for key, hf_names in table.items():
        t = engine[key]
        if key.endswith("linear_qkv.weight"):
            pieces = split_qkv(t, s)
        elif key.endswith("linear_fc1.weight"):
            pieces = split_fc1(t)
        elif key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            pieces = (t[: s.vocab_size],)  # drop Megatron's vocab padding rows
        else:
            pieces = (t,)
        for name, piece in zip(hf_names, pieces):
            if name in out:
                dups.append(f"{name} <- {owner[name]} and {key}")
            out[name] = piece
            owner[name] = key
    if dups:
        raise UserError("Several engine tensors map to the same Hugging Face tensor:", problems=dups)
    return out, table


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints without NeMo (torch.distributed.checkpoint / safetensors).
# ----------------------------------------------------------------------------------------------------------------


def read_engine_weights(ckpt: Path, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Model tensors of a NeMo 2 checkpoint (``ckpt/weights``, torch_dist), layer-stacked tensors unstacked.

    Keys are returned without the ``module.`` prefix, per layer (``decoder.layers.3.mlp.linear_fc2.weight``).
    Optimizer state and ``_extra_state`` entries are skipped.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    wdir = Path(ckpt) / "weights"
    reader = dcp.FileSystemReader(str(wdir))
    try:
        meta = reader.read_metadata()
    except Exception as exc:  # noqa: BLE001 - any read failure means the same thing to the user
        raise UserError(
            f"Cannot read the checkpoint metadata in {wdir} ({type(exc).__name__}: {exc}). The checkpoint is "
            "partial or corrupt; pick an earlier complete checkpoint or re-run the step that wrote it."
        ) from exc
    state: dict[str, torch.Tensor] = {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        if not key.startswith("module.") or key.endswith("_extra_state"):
            continue
        state[key] = torch.empty(md.size, dtype=md.properties.dtype)
    if not state:
        raise UserError(f"{wdir} holds no model tensors (no 'module.*' entries); it is not a NeMo model checkpoint.")
    try:
        dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"Reading tensors from {wdir} failed ({type(exc).__name__}: {exc}); the checkpoint is partial or corrupt."
        ) from exc
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        key = key[len("module."):]
        if key.startswith("decoder.layers.") and not key.split(".")[2].isdigit():
            # megatron dist-ckpt stacks the layers along a new first axis
            rest = key[len("decoder.layers."):]
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = t[i]
        else:
            out[key] = t
    return out


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        bins = sorted(Path(hf_dir).glob("pytorch_model*.bin"))
        if not bins:
            raise UserError(f"No *.safetensors or pytorch_model*.bin weights in {hf_dir}.")
        out = {}
        for b in bins:
            out.update(torch.load(b, map_location="cpu", weights_only=True))
        return out
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@dataclass
class TensorCheck:
    hf_name: str
    engine_name: str | None
    shape: list[int]
    dtype: str
    status: str  # "equal" | "mismatch" | "shape" | "missing" | "unmapped"
    max_abs_diff: float = 0.0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class VerifyReport:
    checks: list[TensorCheck] = field(default_factory=list)

    @property
    def bad(self) -> list[TensorCheck]:
        return [c for c in self.checks if c.status != "equal"]

    def problems(self) -> list[str]:
        msgs = []
        for c in self.bad:
            if c.status == "missing":
                msgs.append(f"{c.hf_name}: present in the HF weights, absent from the engine checkpoint")
            elif c.status == "unmapped":
                msgs.append(f"{c.hf_name}: no engine tensor maps to it")
            elif c.status == "shape":
                msgs.append(f"{c.hf_name} <- {c.engine_name}: shape mismatch ({c.shape})")
            else:
                msgs.append(f"{c.hf_name} <- {c.engine_name}: values differ (max |diff| {c.max_abs_diff:.3g})")
        return msgs


def compare_hf_vs_engine(hf: dict[str, torch.Tensor], engine_as_hf: dict[str, torch.Tensor],
                         owner: dict[str, str]) -> VerifyReport:
    """Bit-exact per-tensor comparison of HF tensors against engine tensors already mapped to HF names."""
    rep = VerifyReport()
    for name in sorted(set(hf) | set(engine_as_hf)):
        h, e = hf.get(name), engine_as_hf.get(name)
        if h is None:
            rep.checks.append(TensorCheck(name, owner.get(name), list(e.shape), str(e.dtype), "unmapped"))
            continue
        if e is None:
            rep.checks.append(TensorCheck(name, None, list(h.shape), str(h.dtype), "missing"))
            continue
        if tuple(h.shape) != tuple(e.shape):
            rep.checks.append(TensorCheck(name, owner.get(name), [list(h.shape), list(e.shape)], str(h.dtype), "shape"))
            continue
        diff = (h.float() - e.float()).abs().max().item() if h.numel() else 0.0
        equal = h.dtype == e.dtype and torch.equal(h, e)
        status = "equal" if equal else "mismatch"
        rep.checks.append(TensorCheck(name, owner.get(name), list(h.shape), str(h.dtype), status, diff))
    return rep


def verify_engine_against_hf(ckpt: Path, hf_dir: Path, hf_weights: dict[str, torch.Tensor] | None = None) -> VerifyReport:
    """Every HF tensor must land, bit-exact, in the engine checkpoint (and nothing else may be there)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    s = Shape.from_hf(cfg)
    hf = hf_weights if hf_weights is not None else read_hf_weights(hf_dir)
    if s.tie_word_embeddings:
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    engine = read_engine_weights(ckpt)
    as_hf, table = engine_tensors_as_hf(engine, s)
    owner = {h: e for e, hs in table.items() for h in hs}
    return compare_hf_vs_engine(hf, as_hf, owner)


# ----------------------------------------------------------------------------------------------------------------
# Import through NeMo's importer.
# ----------------------------------------------------------------------------------------------------------------


def _cpu_only() -> bool:
    return not torch.cuda.is_available()


def have_transformer_engine() -> bool:
    from nemo.collections.llm.gpt.model.base import HAVE_TE

    return bool(HAVE_TE)


def te_free_overrides() -> dict[str, Any]:
    """Config fields that need Transformer Engine / CUDA kernels; turned off only where TE is absent."""
    if have_transformer_engine():
        return {}
    return dict(apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
                bias_activation_fusion=False, masked_softmax_fusion=False, cross_entropy_loss_fusion=False)


def llama31_config_from_hf(cfg: dict):
    """A NeMo ``Llama31Config`` carrying every field of an HF Llama 3.1 config (not only rope factor)."""
    from nemo.collections.llm.gpt.model.llama import Llama31Config, LlamaConfig

    rs = cfg.get("rope_scaling") or {}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), torch.float32
    )
    vocab = cfg["vocab_size"]
    base = 128
    while vocab % base:
        base //= 2
    common = dict(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        init_method_std=cfg.get("initializer_range", 0.02),
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-5),
        seq_length=cfg.get("max_position_embeddings", 8192),
        rotary_base=cfg.get("rope_theta", 500000.0),
        make_vocab_size_divisible_by=base,
        vocab_size=vocab,
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        **te_free_overrides(),
    )
    if rs.get("rope_type", rs.get("type")) == "llama3":
        return Llama31Config(
            scale_factor=float(rs.get("factor", 8.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            old_context_len=int(rs.get("original_max_position_embeddings", 8192)),
            **common,
        )
    if rs:
        raise UserError(
            f"rope_scaling {rs} is not Llama 3.1's 'llama3' scaling; only Llama-3.1-architecture models are supported."
        )
    return LlamaConfig(**common)


def check_llama_hf_config(cfg: dict, where: Path) -> None:
    problems = []
    if cfg.get("model_type") != "llama":
        problems.append(f"model_type is {cfg.get('model_type')!r}, expected 'llama'")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=true (Llama 3.1 has none)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true (Llama 3.1 has none)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {cfg.get('hidden_act')!r}, expected 'silu'")
    if problems:
        raise UserError(f"{where}/config.json is not a Llama-3.1-architecture model:", problems=problems)


def _importer_class():
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, LlamaModel
    from nemo.lightning import io

    class EllamaHFLlamaImporter(HFLlamaImporter):
        """HFLlamaImporter with a complete config, a private tokenizer stage dir and spec-aware norm names."""

        hf_config: dict = {}
        stage_dir: str = ""

        def init(self) -> LlamaModel:
            return LlamaModel(self.config, tokenizer=self.tokenizer)

        @property
        def config(self):
            return llama31_config_from_hf(self.hf_config)

        def nemo_setup(self, model, trainer=None, *args, **kwargs):
            # Synchronous save: the async writer spawns a process (needs __main__ guards) and calls
            # torch.cuda.synchronize() in megatron.core.dist_checkpointing.strategies.filesystem_async.
            kwargs.setdefault("ckpt_async_save", False)
            return super().nemo_setup(model, trainer, *args, **kwargs)

        def save_hf_tokenizer_assets(self, tokenizer_name_or_path, save_path=None):
            return super().save_hf_tokenizer_assets(tokenizer_name_or_path, save_path=self.stage_dir)

        def convert_state(self, source, target):
            from nemo.collections.llm.gpt.model.llama import TransformFns

            target_keys = set((target.module if hasattr(target, "module") else target).state_dict())
            names = TE_NORM_NAMES if any(k.endswith(TE_NORM_NAMES["input"]) for k in target_keys) else LOCAL_NORM_NAMES
            mapping = {
                "model.embed_tokens.weight": "embedding.word_embeddings.weight",
                "model.layers.*.self_attn.o_proj.weight": "decoder.layers.*.self_attention.linear_proj.weight",
                "model.layers.*.input_layernorm.weight": "decoder.layers.*." + names["input"],
                "model.layers.*.post_attention_layernorm.weight": "decoder.layers.*." + names["post_attention"],
                "model.layers.*.mlp.down_proj.weight": "decoder.layers.*.mlp.linear_fc2.weight",
                "model.norm.weight": "decoder.final_layernorm.weight",
                "lm_head.weight": "output_layer.weight",
            }
            if getattr(source.config, "tie_word_embeddings", False):
                del mapping["lm_head.weight"]
            transforms = [
                io.state_transform(
                    source_key=("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
                                "model.layers.*.self_attn.v_proj.weight"),
                    target_key="decoder.layers.*.self_attention.linear_qkv.weight",
                    fn=TransformFns.merge_qkv,
                ),
                io.state_transform(
                    source_key=("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"),
                    target_key="decoder.layers.*.mlp.linear_fc1.weight",
                    fn=TransformFns.merge_fc1,
                ),
            ]
            return io.apply_transforms(source, target, mapping=mapping, transforms=transforms)

    return EllamaHFLlamaImporter


def import_hf_to_engine(hf_dir: Path, out: Path) -> VerifyReport:
    """Convert an HF Llama 3.1 directory into a NeMo 2 checkpoint at ``out`` and verify every tensor.

    ``out`` must not exist. Raises UserError (after removing ``out``) if verification finds unmapped or
    mismatched tensors.
    """
    from ellama_recipes.engine import cpu_compat

    cpu_compat.apply_conversion_redirects()
    hf_dir, out = Path(hf_dir).resolve(), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    check_llama_hf_config(cfg, hf_dir)
    cls = _importer_class()
    stage = tempfile.mkdtemp(prefix="ellama-tok-")
    try:
        importer = cls(str(hf_dir))
        importer.hf_config = cfg
        importer.stage_dir = os.path.join(stage, "nemo_tokenizer")
        importer(output_path=out, overwrite=False)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    rep = verify_engine_against_hf(out, hf_dir)
    if rep.bad:
        shutil.rmtree(out, ignore_errors=True)
        raise UserError(
            f"Import verification failed: {len(rep.bad)} of {len(rep.checks)} Hugging Face tensors did not land "
            f"bit-exact in the engine checkpoint (nothing was written to {out}). This is a converter bug or an "
            "unsupported architecture; report it with the list below.",
            problems=rep.problems(),
        )
    return rep
