"""The one Llama 3.1 bridge: configs (HF config.json <-> recipe ModelSpec fields <-> NeMo ``Llama31Config``) and
weights (one declarative mapping table, HF tensor names <-> Megatron distributed-checkpoint keys).

Modelled on Megatron-Bridge's ``LlamaBridge`` (``provider_bridge`` for the config, ``mapping_registry`` of
``AutoMapping`` / ``QKVMapping`` / ``GatedMLPMapping`` rows for the weights). Everything that names a Llama field
or tensor is here, once:

* :data:`CONFIG_FIELDS` - one row per architecture field: the recipe's name (``ModelSpec`` / ``sizes.Architecture``),
  NeMo's ``Llama31Config`` name and the HF ``config.json`` path. :func:`spec_from_hf`, :func:`hf_from_spec`,
  :func:`nemo_kwargs`, :func:`spec_from_nemo` and :func:`checkpoint_spec` are all read off it.
* :data:`WEIGHTS` - one row per tensor: Megatron key (``*`` = layer index), HF names, kind
  (``direct`` / ``norm`` / ``qkv`` / ``gate_up`` / ``vocab``) and the HF shapes in symbols. Import, export,
  verification, the export dry-run table and the shape checks all iterate over :func:`expand` of this table.

The kinds' conversions call NeMo's own ``TransformFns`` (the layout the engine defines); the verifier's
:func:`split_qkv` / :func:`split_fc1` are independent plain-torch inverses, so a wrong converter cannot verify itself.

NeMo is imported lazily (inside functions): describing an import (``--dryrun``) stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import torch

from ellama_recipes.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Config bridge
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigField:
    spec: str  # ModelSpec / sizes.Architecture field
    nemo: str | None  # Llama31Config field (None: not an engine field; rides in the source config)
    hf: str  # config.json key; "a.b" = nested (rope_scaling.factor)
    hf_default: Any = None  # value when config.json omits it (None: required)


CONFIG_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("num_layers", "num_layers", "num_hidden_layers"),
    ConfigField("hidden_size", "hidden_size", "hidden_size"),
    ConfigField("ffn_hidden_size", "ffn_hidden_size", "intermediate_size"),
    ConfigField("num_attention_heads", "num_attention_heads", "num_attention_heads"),
    ConfigField("num_query_groups", "num_query_groups", "num_key_value_heads"),
    ConfigField("vocab_size", "vocab_size", "vocab_size"),
    ConfigField("max_position_embeddings", None, "max_position_embeddings", 131072),
    ConfigField("rope_theta", "rotary_base", "rope_theta", 500000.0),
    ConfigField("rope_scaling_factor", "scale_factor", "rope_scaling.factor", 1.0),  # 1.0 = no scaling (exact)
    ConfigField("low_freq_factor", "low_freq_factor", "rope_scaling.low_freq_factor", 1.0),
    ConfigField("high_freq_factor", "high_freq_factor", "rope_scaling.high_freq_factor", 4.0),
    ConfigField("original_max_position_embeddings", "old_context_len",
                "rope_scaling.original_max_position_embeddings", 8192),
    ConfigField("norm_eps", "layernorm_epsilon", "rms_norm_eps", 1e-5),
    ConfigField("tie_word_embeddings", "share_embeddings_and_output_weights", "tie_word_embeddings", False),
)

# Written into every imported checkpoint's context/nemo_tokenizer/ (travels into trainer checkpoints too): the
# source's full HF config, for the fields NeMo has no place for (max_position_embeddings, bos/eos id lists).
SOURCE_CONFIG_NAME = "ellama_source_config.json"


def _as_dict(spec: Any) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return dict(spec)
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    raise TypeError(f"expected a mapping or a ModelSpec/Architecture dataclass, got {type(spec).__name__}")


def head_dim(spec: Any) -> int:
    s = _as_dict(spec)
    return s["hidden_size"] // s["num_attention_heads"]


def check_hf_config(cfg: dict, where: str | Path = "config.json") -> None:
    """UserError unless ``cfg`` (an HF config.json dict) is a Llama-3.1-architecture model this bridge maps."""
    problems = []
    if cfg.get("model_type") != "llama":
        problems.append(f"model_type is {cfg.get('model_type')!r}, expected 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}=true (Llama 3.1 has none)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {cfg.get('hidden_act')!r}, expected 'silu'")
    rs = cfg.get("rope_scaling") or {}
    if rs and rs.get("rope_type", rs.get("type")) != "llama3":
        problems.append(f"rope_scaling {rs} is not Llama 3.1's 'llama3' scaling")
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if heads and hidden and cfg.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads ({hidden // heads})")
    missing = [f.hf for f in CONFIG_FIELDS if f.hf_default is None and f.hf not in cfg and
               not (f.hf == "num_key_value_heads" and "num_attention_heads" in cfg)]
    problems += [f"{k} is missing" for k in missing]
    if problems:
        raise UserError(f"{where} is not a Llama-3.1-architecture model config:", problems=problems)


def spec_from_hf(cfg: dict, where: str | Path = "config.json") -> dict[str, Any]:
    """HF config.json dict -> ModelSpec / Architecture field values (``sizes.Architecture(**result)`` works)."""
    check_hf_config(cfg, where)
    out: dict[str, Any] = {}
    for f in CONFIG_FIELDS:
        node: Any = cfg
        for part in f.hf.split("."):
            node = (node or {}).get(part) if isinstance(node, dict) or node is None else None
        if node is None:
            node = cfg["num_attention_heads"] if f.hf == "num_key_value_heads" else f.hf_default
        out[f.spec] = type(f.hf_default)(node) if f.hf_default is not None else node
    return out


def hf_from_spec(spec: Any) -> dict[str, Any]:
    """ModelSpec / Architecture -> the architecture part of an HF Llama config.json (llama3 RoPE scaling)."""
    s = _as_dict(spec)
    out: dict[str, Any] = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                           "attention_bias": False, "mlp_bias": False, "head_dim": head_dim(s),
                           "rope_scaling": {"rope_type": "llama3"}}
    for f in CONFIG_FIELDS:
        if f.hf.startswith("rope_scaling."):
            out["rope_scaling"][f.hf.split(".", 1)[1]] = s[f.spec]
        else:
            out[f.hf] = s[f.spec]
    return out


def vocab_divisor(vocab_size: int) -> int:
    """Largest power of two <= 128 dividing the vocabulary: Megatron pads nothing (the HF rows map 1:1)."""
    base = 128
    while vocab_size % base:
        base //= 2
    return base


def nemo_kwargs(spec: Any) -> dict[str, Any]:
    """ModelSpec / Architecture -> ``Llama31Config`` keyword arguments for the architecture (no training fields)."""
    s = _as_dict(spec)
    out = {f.nemo: s[f.spec] for f in CONFIG_FIELDS if f.nemo is not None}
    out["kv_channels"] = head_dim(s)
    out["make_vocab_size_divisible_by"] = vocab_divisor(s["vocab_size"])
    return out


def spec_from_nemo(config: Any, source_config: dict | None = None) -> dict[str, Any]:
    """A NeMo Llama config object (or its saved attributes) -> ModelSpec field values it determines.

    ``max_position_embeddings`` is not a NeMo field: it comes from ``source_config`` (the HF config the checkpoint
    was imported from) when given.
    """
    out = {f.spec: getattr(config, f.nemo) for f in CONFIG_FIELDS
           if f.nemo is not None and getattr(config, f.nemo, None) is not None}
    if source_config and source_config.get("max_position_embeddings"):
        out["max_position_embeddings"] = source_config["max_position_embeddings"]
    return out


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def spec_mismatches(spec: Any, expected: Any, fields: tuple[str, ...] = SHAPE_FIELDS) -> list[str]:
    """``"<HF name>: <got> (expected <want>)"`` for each field where ``spec`` differs from ``expected``."""
    s, e = _as_dict(spec), _as_dict(expected)
    hf = {f.spec: f.hf for f in CONFIG_FIELDS}
    return [f"{hf[k]}: {s[k]} (expected {e[k]})" for k in fields if s[k] != e[k]]


def llama31_config(spec: Any, **extra: Any):
    """A NeMo ``Llama31Config`` for the architecture, plus ``extra`` fields (seq_length, params_dtype, ...)."""
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    return Llama31Config(**{**nemo_kwargs(spec), **extra})


def checkpoint_config(path: str | Path):
    """The saved ``model.config`` of an engine checkpoint (not built; fiddle config) or None if not one here."""
    ctx = Path(path) / "context"
    if not ctx.is_dir():
        return None
    from nemo.lightning.io import load_context

    return load_context(ctx, subpath="model.config")


def checkpoint_source_config(path: str | Path) -> dict | None:
    """The HF config.json the checkpoint was imported from (rides in context/nemo_tokenizer/), if any."""
    f = Path(path) / "context" / "nemo_tokenizer" / SOURCE_CONFIG_NAME
    return json.loads(f.read_text()) if f.is_file() else None


def checkpoint_spec(path: str | Path) -> dict[str, Any] | None:
    """An engine checkpoint's architecture as ModelSpec field values (None when ``path`` is not one here)."""
    config = checkpoint_config(path)
    return None if config is None else spec_from_nemo(config, checkpoint_source_config(path))


def checkpoint_nemo_kwargs(path: str | Path) -> dict[str, Any] | None:
    """The architecture kwargs saved in a checkpoint's context (what a run continuing from it must build)."""
    config = checkpoint_config(path)
    if config is None:
        return None
    keys = [f.nemo for f in CONFIG_FIELDS if f.nemo] + ["kv_channels", "make_vocab_size_divisible_by",
                                                        "init_method_std"]
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


# ---------------------------------------------------------------------------------------------------------------
# Weight mapping table
# ---------------------------------------------------------------------------------------------------------------

L = "model.layers.*."  # HF per-layer prefix


@dataclass(frozen=True)
class WeightRow:
    """One declarative mapping row. ``*`` in both names is the layer index; shapes are HF shapes in symbols:
    H hidden, F ffn, V vocab, Q = heads * head_dim, KV = groups * head_dim."""

    megatron: str  # Megatron distributed-checkpoint key without the "module." prefix (TE norm names: the local
    #                layer spec maps its input_layernorm / pre_mlp_layernorm onto these in sharded state dicts)
    hf: tuple[str, ...]
    kind: str  # direct | norm | qkv | gate_up | vocab
    hf_shapes: tuple[tuple[str, ...], ...]


WEIGHTS: tuple[WeightRow, ...] = (
    WeightRow("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", (("V", "H"),)),
    WeightRow("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight", (L + "input_layernorm.weight",),
              "norm", (("H",),)),
    WeightRow("decoder.layers.*.self_attention.linear_qkv.weight",
              (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
              "qkv", (("Q", "H"), ("KV", "H"), ("KV", "H"))),
    WeightRow("decoder.layers.*.self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",), "direct",
              (("H", "Q"),)),
    WeightRow("decoder.layers.*.mlp.linear_fc1.layer_norm_weight", (L + "post_attention_layernorm.weight",),
              "norm", (("H",),)),
    WeightRow("decoder.layers.*.mlp.linear_fc1.weight", (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
              "gate_up", (("F", "H"), ("F", "H"))),
    WeightRow("decoder.layers.*.mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), "direct", (("H", "F"),)),
    WeightRow("decoder.final_layernorm.weight", ("model.norm.weight",), "norm", (("H",),)),
    WeightRow("output_layer.weight", ("lm_head.weight",), "vocab", (("V", "H"),)),  # absent when tied
)

# Megatron modules of a layer that carry an (empty, TE-free) ``_extra_state`` object in the checkpoint.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Group:
    """One row for one layer: a Megatron tensor (one layer's slice of a layer-stacked key) and its HF tensors."""

    row: WeightRow
    layer: int | None  # None for non-layer rows
    megatron: str  # per-layer name (decoder.layers.3.mlp.linear_fc1.weight)
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    engine_shape: tuple[int, ...]  # per layer (vocab rows padded)

    @property
    def key(self) -> str:
        """The distributed-checkpoint key (layer-stacked: ``module.decoder.layers.<rest>``)."""
        return "module." + self.row.megatron.replace(".*.", ".")

    @property
    def stacked(self) -> bool:
        return self.layer is not None


def dims(spec: Any) -> dict[str, int]:
    s = _as_dict(spec)
    hd = head_dim(s)
    return {"H": s["hidden_size"], "F": s["ffn_hidden_size"], "V": s["vocab_size"],
            "Q": s["num_attention_heads"] * hd, "KV": s["num_query_groups"] * hd}


def padded_vocab(spec: Any, divisor: int | None = None) -> int:
    s = _as_dict(spec)
    d = divisor or vocab_divisor(s["vocab_size"])
    return -(-s["vocab_size"] // d) * d


def expand(spec: Any, *, vocab_rows: int | None = None) -> list[Group]:
    """The table instantiated for an architecture: one :class:`Group` per (row, layer), layer-major (the order
    HF shards hold them): embedding, layer 0's rows, layer 1's, ..., final norm, output layer."""
    s = _as_dict(spec)
    d = dims(s)
    rows_v = vocab_rows or padded_vocab(s)

    def group(row: WeightRow, i: int | None) -> Group:
        hf_shapes = tuple(tuple(d[x] for x in shp) for shp in row.hf_shapes)
        if row.kind in ("qkv", "gate_up"):
            eng = (sum(h[0] for h in hf_shapes), hf_shapes[0][1])
        else:
            eng = (rows_v, d["H"]) if row.kind == "vocab" else hf_shapes[0]
        sub = (lambda n: n) if i is None else (lambda n: n.replace("*", str(i)))
        return Group(row, i, sub(row.megatron), tuple(sub(h) for h in row.hf), hf_shapes, eng)

    rows = [r for r in WEIGHTS if not (r.megatron == "output_layer.weight" and s["tie_word_embeddings"])]
    per_layer = [r for r in rows if "*" in r.megatron]
    first = [r for r in rows if "*" not in r.megatron and r.kind == "vocab" and r.megatron.startswith("embedding")]
    last = [r for r in rows if "*" not in r.megatron and r not in first]
    return ([group(r, None) for r in first] + [group(r, i) for i in range(s["num_layers"]) for r in per_layer]
            + [group(r, None) for r in last])


def hf_names(spec: Any) -> list[str]:
    return [h for g in expand(spec) for h in g.hf]


# --- the kinds' conversions (NeMo's TransformFns: the engine's own definition of its layout) ---


def _ctx(spec: Any) -> SimpleNamespace:
    s = _as_dict(spec)
    cfg = SimpleNamespace(num_attention_heads=s["num_attention_heads"], num_query_groups=s["num_query_groups"],
                          hidden_size=s["hidden_size"], kv_channels=head_dim(s))
    return SimpleNamespace(source=SimpleNamespace(config=cfg), target=SimpleNamespace(config=cfg))


def engine_chunks(g: Group) -> list[tuple[int, int, tuple[int, ...]]]:
    """How one group's engine tensor is stored: [(first row, rows, indices of the HF tensors it is made of)].

    Gate and up stay two chunks (as Megatron's own swiglu sharding stores them); padded vocabulary rows are a
    chunk of their own (made of no HF tensor: zeros)."""
    k, rows = g.row.kind, g.engine_shape[0]
    if k == "gate_up":
        f = g.hf_shapes[0][0]
        return [(0, f, (0,)), (f, f, (1,))]
    if k == "vocab" and rows > g.hf_shapes[0][0]:
        v = g.hf_shapes[0][0]
        return [(0, v, (0,)), (v, rows - v, ())]
    return [(0, rows, tuple(range(len(g.hf))))]


def to_engine(g: Group, chunk: int, hf: list[torch.Tensor], spec: Any, dtype: torch.dtype) -> torch.Tensor:
    """The HF tensors of one engine chunk (see :func:`engine_chunks`) -> that chunk in ``dtype``."""
    from nemo.lightning.io.state import TransformFns

    first, rows, _ = engine_chunks(g)[chunk]
    if g.row.kind == "qkv":
        return TransformFns.merge_qkv(_ctx(spec), *hf).to(dtype)
    if not hf:  # padded vocabulary rows
        return torch.zeros(rows, g.engine_shape[1], dtype=dtype)
    return hf[0].to(dtype)


def to_hf(g: Group, engine: torch.Tensor, spec: Any, dtype: torch.dtype) -> list[torch.Tensor]:
    """One engine tensor (one layer) -> its HF tensors in ``dtype``."""
    from nemo.lightning.io.state import TransformFns

    k = g.row.kind
    if k == "qkv":
        parts = TransformFns.split_qkv(_ctx(spec), engine)
    elif k == "gate_up":
        parts = TransformFns.split_fc1(engine)
    elif k == "vocab":
        parts = (engine[: g.hf_shapes[0][0]],)
    else:
        parts = (engine,)
    return [p.to(dtype).contiguous() for p in parts]


# --- the verifier's independent inverses (plain torch; no NeMo) ---


def split_qkv(qkv: torch.Tensor, spec: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's interleaved QKV [(heads_per_group + 2) * groups * head_dim, hidden] -> HF q, k, v."""
    s = _as_dict(spec)
    hpg, hd = s["num_attention_heads"] // s["num_query_groups"], head_dim(s)
    x = qkv.reshape(s["num_query_groups"], hpg + 2, hd, qkv.shape[-1])
    q = x[:, :hpg].reshape(s["num_attention_heads"] * hd, -1)
    k = x[:, hpg].reshape(s["num_query_groups"] * hd, -1)
    v = x[:, hpg + 1].reshape(s["num_query_groups"] * hd, -1)
    return q, k, v


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's fused SwiGLU fc1 = cat([gate, up]) -> HF gate_proj, up_proj."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def verify_split(g: Group, engine: torch.Tensor, spec: Any) -> tuple[torch.Tensor, ...]:
    """The verifier's view of one engine tensor as HF tensors (engine dtype, no rounding)."""
    if g.row.kind == "qkv":
        return split_qkv(engine, spec)
    if g.row.kind == "gate_up":
        return split_fc1(engine)
    if g.row.kind == "vocab":
        return (engine[: g.hf_shapes[0][0]],)
    return (engine,)


def groups_by_hf(groups: list[Group]) -> Iterator[tuple[str, Group, int]]:
    for g in groups:
        for j, h in enumerate(g.hf):
            yield h, g, j
