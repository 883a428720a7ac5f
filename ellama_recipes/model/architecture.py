"""The Llama 3.1 architecture, declared once, and its names in Hugging Face and NeMo configs (no NeMo import).

:class:`Architecture` is the one declaration of a Llama 3.1 shape: the size table (:mod:`ellama_recipes.model.sizes`)
holds one per size, a stage config's ``model`` is one (plus how attention is computed,
:class:`ellama_recipes.config.schema.ModelConfig`), the tiny builder writes one to an HF ``config.json``, ``ellama
merge`` compares the HF keys it names, and the engine's bridge (:mod:`ellama_recipes.engine.bridge`) maps it onto
NeMo's ``Llama31Config``.

:data:`FIELDS` is the config bridge's table (Megatron-Bridge's ``provider_bridge``, without the NeMo import): one
row per field, its name here, in NeMo's ``Llama31Config`` and in HF ``config.json``, and the HF default.
Everything that converts an architecture between the three worlds reads it:

    from_hf(config_json_dict)    -> field values          to_hf(arch)            -> HF config.json keys
    from_nemo(nemo_config)       -> field values          from_checkpoint(ckpt)  -> field values (context/model.yaml)

"Field values" is a plain ``dict`` (``Architecture(**values)`` builds the object); every function here takes an
:class:`Architecture`, any dataclass with its fields, or such a dict.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ellama_recipes.errors import UserError


@dataclass
class Architecture:
    """Llama 3.1 architecture hyper-parameters (HF ``config.json`` names in :data:`FIELDS`)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads (GQA)
    vocab_size: int
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    # llama3 RoPE scaling (HF rope_scaling={"rope_type": "llama3", ...})
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Exact parameter count (embeddings, untied output layer, attention, SwiGLU MLP, RMSNorms)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * f  # gate, up, down
        per_layer = attn + mlp + 2 * h  # + input/post-attention RMSNorm
        emb = self.vocab_size * h
        out = 0 if self.tie_word_embeddings else self.vocab_size * h
        return L * per_layer + emb + out + h  # + final norm

    @classmethod
    def of(cls, spec: Any) -> "Architecture":
        """An Architecture from field values (a dict, or any dataclass carrying the fields: extra keys ignored)."""
        values = as_fields(spec)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Architecture))
# The fields that fix the tensor shapes (what `import-hf --size S` compares against the size row).
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@dataclass(frozen=True)
class ArchField:
    name: str  # Architecture field
    nemo: str | None  # Llama31Config field (None: not an engine field; rides in the source config)
    hf: str  # config.json key; "a.b" = nested (rope_scaling.factor)
    hf_default: Any = None  # value when config.json omits it (None: required)


FIELDS: tuple[ArchField, ...] = (
    ArchField("num_layers", "num_layers", "num_hidden_layers"),
    ArchField("hidden_size", "hidden_size", "hidden_size"),
    ArchField("ffn_hidden_size", "ffn_hidden_size", "intermediate_size"),
    ArchField("num_attention_heads", "num_attention_heads", "num_attention_heads"),
    ArchField("num_query_groups", "num_query_groups", "num_key_value_heads"),
    ArchField("vocab_size", "vocab_size", "vocab_size"),
    ArchField("max_position_embeddings", None, "max_position_embeddings", 131072),
    ArchField("rope_theta", "rotary_base", "rope_theta", 500000.0),
    ArchField("rope_scaling_factor", "scale_factor", "rope_scaling.factor", 1.0),  # 1.0 = no scaling (exact)
    ArchField("low_freq_factor", "low_freq_factor", "rope_scaling.low_freq_factor", 1.0),
    ArchField("high_freq_factor", "high_freq_factor", "rope_scaling.high_freq_factor", 4.0),
    ArchField("original_max_position_embeddings", "old_context_len",
              "rope_scaling.original_max_position_embeddings", 8192),
    ArchField("norm_eps", "layernorm_epsilon", "rms_norm_eps", 1e-5),
    ArchField("tie_word_embeddings", "share_embeddings_and_output_weights", "tie_word_embeddings", False),
)
assert tuple(f.name for f in FIELDS) == NAMES, "FIELDS must list every Architecture field, in order"

# ------------------------------------------------------------------------------------------------ padded vocabulary
# The padded-vocab row of the bridge: the ONE padding rule (import, training, resharding, export, --dryrun read it).
# Megatron-LM (``_vocab_size_with_padding``, megatron/training/tokenizer/tokenizer.py) and NeMo 2
# (``get_vocab_size`` in nemo/lightning/base.py, used when the config has no vocab_size) pad the embedding and output
# layer to a multiple of ``make_vocab_size_divisible_by x TP`` so every tensor-parallel rank holds the same number of
# rows. The padded rows are engine-only: their logits are masked (the dtype's lowest value: exp() = 0) before any
# softmax / loss (engine/vocab.py), and export trims them.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128  # NeMo GPTConfig.make_vocab_size_divisible_by / Megatron-LM default


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1,
                      divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """``ceil(V / (divisible_by * TP)) * (divisible_by * TP)``: the engine's embedding / output rows at this TP."""
    multiple = max(1, int(divisible_by)) * max(1, int(tensor_parallel))
    return -(-int(vocab_size) // multiple) * multiple


def vocab_padding_note(vocab_size: int, tensor_parallel: int = 1,
                       divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> str:
    """The dry-run line: ``"vocab 1495 -> padded 1536 at TP2"``."""
    return (f"vocab {vocab_size} -> padded {padded_vocab_size(vocab_size, tensor_parallel, divisible_by)} "
            f"at TP{tensor_parallel}")


# HF config.json keys that are not fields but say "this is a Llama 3.1 layout" (written by to_hf, checked by check_hf).
HF_FIXED = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False}
# The HF keys that fix what each tensor means (equal in two checkpoints that `ellama merge` interpolates):
# every field's top-level key but the position limit, plus the fixed layout keys.
HF_LAYOUT_KEYS: tuple[str, ...] = ("model_type", "architectures", "hidden_act", "head_dim") + tuple(
    dict.fromkeys(f.hf.split(".", 1)[0] for f in FIELDS if f.name != "max_position_embeddings"))

# Written into every imported checkpoint's context/nemo_tokenizer/ (travels into trainer checkpoints too): the
# source's full HF config, for the fields NeMo has no place for (max_position_embeddings, bos/eos id lists).
SOURCE_CONFIG_NAME = "ellama_source_config.json"


def as_fields(spec: Any) -> dict[str, Any]:
    """Field values of ``spec`` (an Architecture, a dataclass with its fields, or a mapping)."""
    if isinstance(spec, Mapping):
        return dict(spec)
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    raise TypeError(f"expected a mapping or an Architecture dataclass, got {type(spec).__name__}")


def head_dim(spec: Any) -> int:
    s = as_fields(spec)
    return s["hidden_size"] // s["num_attention_heads"]


# ------------------------------------------------------------------------------------------------ HF config.json
def read_hf_config(hf_dir: str | Path) -> dict:
    """``hf_dir/config.json`` as a dict (UserError when missing or not JSON)."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise UserError(f"{hf_dir} has no config.json; --from must be a Hugging Face model directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-download the model.") from exc


def check_hf(cfg: dict, where: str | Path = "config.json") -> None:
    """UserError unless ``cfg`` (an HF config.json dict) is a Llama-3.1-architecture model the bridge maps."""
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
    missing = [f.hf for f in FIELDS if f.hf_default is None and f.hf not in cfg and
               not (f.hf == "num_key_value_heads" and "num_attention_heads" in cfg)]
    problems += [f"{k} is missing" for k in missing]
    if problems:
        raise UserError(f"{where} is not a Llama-3.1-architecture model config:", problems=problems)


def from_hf(cfg: dict, where: str | Path = "config.json") -> dict[str, Any]:
    """HF config.json dict -> field values (``Architecture(**result)`` works); checked by :func:`check_hf`."""
    check_hf(cfg, where)
    out: dict[str, Any] = {}
    for f in FIELDS:
        node: Any = cfg
        for part in f.hf.split("."):
            node = (node or {}).get(part) if isinstance(node, dict) or node is None else None
        if node is None:
            node = cfg["num_attention_heads"] if f.hf == "num_key_value_heads" else f.hf_default
        out[f.name] = type(f.hf_default)(node) if f.hf_default is not None else node
    return out


def to_hf(spec: Any) -> dict[str, Any]:
    """Field values -> the architecture part of an HF Llama config.json (llama3 RoPE scaling)."""
    s = as_fields(spec)
    out: dict[str, Any] = {**HF_FIXED, "architectures": list(HF_FIXED["architectures"]), "head_dim": head_dim(s),
                           "rope_scaling": {"rope_type": "llama3"}}
    for f in FIELDS:
        if f.hf.startswith("rope_scaling."):
            out["rope_scaling"][f.hf.split(".", 1)[1]] = s[f.name]
        else:
            out[f.hf] = s[f.name]
    return out


def mismatches(spec: Any, expected: Any, fields: tuple[str, ...] = SHAPE_FIELDS) -> list[str]:
    """``"<HF name>: <got> (expected <want>)"`` for each field where ``spec`` differs from ``expected``."""
    s, e = as_fields(spec), as_fields(expected)
    hf = {f.name: f.hf for f in FIELDS}
    return [f"{hf[k]}: {s[k]} (expected {e[k]})" for k in fields if s[k] != e[k]]


# ------------------------------------------------------------------------------------------------ NeMo configs
def from_nemo(config: Any, source_config: dict | None = None) -> dict[str, Any]:
    """A NeMo Llama config (an object with its attributes, or the saved dict) -> the field values it determines.

    ``max_position_embeddings`` is not a NeMo field: it comes from ``source_config`` (the HF config the checkpoint
    was imported from) when given.
    """
    get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    out = {f.name: get(f.nemo) for f in FIELDS if f.nemo is not None and get(f.nemo) is not None}
    if source_config and source_config.get("max_position_embeddings"):
        out["max_position_embeddings"] = source_config["max_position_embeddings"]
    return out


def saved_model_config(ckpt: str | Path) -> dict[str, Any] | None:
    """The model config an engine checkpoint saved (``context/model.yaml``'s ``config``, NeMo's names), read as plain
    YAML (no NeMo import, so dry runs stay fast); None when ``ckpt`` has none or it is unreadable."""
    f = Path(ckpt) / "context" / "model.yaml"
    if not f.is_file():
        return None
    import yaml

    try:
        return (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("config") or {}
    except yaml.YAMLError:
        return None


def source_config(ckpt: str | Path) -> dict | None:
    """The HF config.json the checkpoint was imported from (rides in ``context/nemo_tokenizer/``), if any."""
    f = Path(ckpt) / "context" / "nemo_tokenizer" / SOURCE_CONFIG_NAME
    return json.loads(f.read_text()) if f.is_file() else None


def from_checkpoint(ckpt: str | Path) -> dict[str, Any] | None:
    """An engine checkpoint's architecture as field values (None when ``ckpt`` is not one here)."""
    saved = saved_model_config(ckpt)
    return None if saved is None else from_nemo(saved, source_config(ckpt))


def tokenizer_size(ckpt_or_hf_dir: str | Path) -> int | None:
    """``len(tokenizer)`` (added tokens included) of an engine checkpoint's staged tokenizer
    (``context/nemo_tokenizer/tokenizer.json``) or of an HF directory's ``tokenizer.json``; None when there is none."""
    d = Path(ckpt_or_hf_dir)
    f = next((p for p in (d / "context" / "nemo_tokenizer" / "tokenizer.json", d / "tokenizer.json") if p.is_file()),
             None)
    if f is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(f)).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported by whoever loads it
        return None
