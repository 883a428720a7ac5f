"""The one Llama 3.1 bridge to the engine: the NeMo config (``Llama31Config``) of an architecture, and the weights
(one declarative mapping table, HF tensor names <-> Megatron distributed-checkpoint keys).

Modelled on Megatron-Bridge's ``LlamaBridge`` (``provider_bridge`` for the config, ``mapping_registry`` of
``AutoMapping`` / ``QKVMapping`` / ``GatedMLPMapping`` rows for the weights):

* config: the field table (name here / NeMo / HF) is :data:`ellama_recipes.model.architecture.FIELDS`, NeMo-free so
  dry runs and the recipes read it without importing NeMo; :func:`nemo_kwargs` and :func:`llama31_config` turn an
  architecture into ``Llama31Config`` arguments with it, :func:`checkpoint_nemo_kwargs` reads them back from a
  checkpoint.
* padded vocabulary: the rule is :func:`ellama_recipes.model.architecture.padded_vocab_size` (Megatron's
  ``ceil(V / (make_vocab_size_divisible_by x TP))``, divisible_by 128); :func:`padded_vocab` applies it to an
  architecture, the ``vocab`` kind below carries the padded rows (zeros on import, trimmed on export) and
  :mod:`ellama_recipes.engine.vocab` pads the model per TP and masks the padded logits.
* :data:`WEIGHTS` - one row per tensor: Megatron key (``*`` = layer index), HF names, kind
  (``direct`` / ``norm`` / ``qkv`` / ``gate_up`` / ``vocab``) and the HF shapes in symbols. Import, export,
  verification, the export dry-run table and the shape checks all iterate over :func:`expand` of this table.

The kinds' conversions call NeMo's own ``TransformFns`` (the layout the engine defines); the verifier's
:func:`split_qkv` / :func:`split_fc1` are independent plain-torch inverses, so a wrong converter cannot verify itself.

NeMo is imported lazily (inside functions): describing an import (``--dryrun``) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from ellama_recipes.model.architecture import (
    FIELDS, MAKE_VOCAB_SIZE_DIVISIBLE_BY, as_fields, head_dim, padded_vocab_size, saved_model_config,
)

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def nemo_kwargs(spec: Any) -> dict[str, Any]:
    """Architecture -> ``Llama31Config`` keyword arguments for the architecture (no training fields)."""
    s = as_fields(spec)
    out = {f.nemo: s[f.name] for f in FIELDS if f.nemo is not None}
    out["kv_channels"] = head_dim(s)
    out["make_vocab_size_divisible_by"] = MAKE_VOCAB_SIZE_DIVISIBLE_BY  # the padded-vocab row (architecture.py)
    return out


def llama31_config(spec: Any, **extra: Any):
    """A NeMo ``Llama31Config`` for the architecture, plus ``extra`` fields (seq_length, params_dtype, ...): the
    engine's :class:`~ellama_recipes.engine.vocab.PaddedLlama31Config` (vocabulary padded per TP, padded logits
    masked)."""
    from ellama_recipes.engine.vocab import PaddedLlama31Config

    return PaddedLlama31Config(**{**nemo_kwargs(spec), **extra})


def checkpoint_nemo_kwargs(path: str | Path) -> dict[str, Any] | None:
    """The architecture kwargs saved in a checkpoint's context (what a run continuing from it must build)."""
    saved = saved_model_config(path)
    if saved is None:
        return None
    keys = [f.nemo for f in FIELDS if f.nemo] + ["kv_channels", "make_vocab_size_divisible_by", "init_method_std"]
    return {k: saved[k] for k in keys if saved.get(k) is not None}


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
    s = as_fields(spec)
    hd = head_dim(s)
    return {"H": s["hidden_size"], "F": s["ffn_hidden_size"], "V": s["vocab_size"],
            "Q": s["num_attention_heads"] * hd, "KV": s["num_query_groups"] * hd}


def padded_vocab(spec: Any, tensor_parallel: int = 1, divisor: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    """The engine's vocabulary rows for ``spec`` at ``tensor_parallel`` (the padded-vocab row:
    :func:`ellama_recipes.model.architecture.padded_vocab_size`). Import writes the TP1 size; a run at another TP
    pads further when it loads (megatron loads the vocabulary tensors ``allow_shape_mismatch``)."""
    return padded_vocab_size(as_fields(spec)["vocab_size"], tensor_parallel, divisor)


def expand(spec: Any, *, vocab_rows: int | None = None) -> list[Group]:
    """The table instantiated for an architecture: one :class:`Group` per (row, layer), layer-major (the order
    HF shards hold them): embedding, layer 0's rows, layer 1's, ..., final norm, output layer."""
    s = as_fields(spec)
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
    s = as_fields(spec)
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
    s = as_fields(spec)
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
