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
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    status: str  # "equal" | "mismatch" | "shape" | "missing_in_engine" | "missing_in_hf"
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
            if c.status == "missing_in_engine":
                msgs.append(f"{c.hf_name}: in the HF weights, absent from the engine checkpoint (unmapped)")
            elif c.status == "missing_in_hf":
                msgs.append(f"{c.hf_name} <- {c.engine_name}: in the engine checkpoint, absent from the HF weights "
                            "(dropped)")
            elif c.status == "shape":
                msgs.append(f"{c.hf_name} <- {c.engine_name}: shape mismatch ({c.shape})")
            else:
                msgs.append(f"{c.hf_name} <- {c.engine_name}: values differ (max |diff| {c.max_abs_diff:.3g})")
        return msgs


def _same(h: torch.Tensor, e: torch.Tensor, direction: str) -> bool:
    """Bit-exact, allowing only dtype changes that lose nothing the direction must keep.

    import: the engine tensor may be a lossless widening of the HF one (bf16 norm -> fp32 local RMSNorm).
    export: the HF tensor must be exactly the engine tensor in the export dtype (what save in that dtype means).
    """
    if h.dtype == e.dtype:
        return torch.equal(h, e)
    if direction == "import":
        return torch.equal(h.to(e.dtype), e) and torch.equal(e.to(h.dtype), h)
    return torch.equal(e.to(h.dtype), h)


def compare_hf_vs_engine(hf: dict[str, torch.Tensor], engine_as_hf: dict[str, torch.Tensor],
                         owner: dict[str, str], direction: str = "import") -> VerifyReport:
    """Bit-exact per-tensor comparison of HF tensors against engine tensors already mapped to HF names."""
    rep = VerifyReport()
    for name in sorted(set(hf) | set(engine_as_hf)):
        h, e = hf.get(name), engine_as_hf.get(name)
        if h is None:
            rep.checks.append(TensorCheck(name, owner.get(name), list(e.shape), str(e.dtype), "missing_in_hf"))
            continue
        if e is None:
            rep.checks.append(TensorCheck(name, None, list(h.shape), str(h.dtype), "missing_in_engine"))
            continue
        if tuple(h.shape) != tuple(e.shape):
            rep.checks.append(TensorCheck(name, owner.get(name), [list(h.shape), list(e.shape)], str(h.dtype), "shape"))
            continue
        diff = (h.float() - e.float()).abs().max().item() if h.numel() else 0.0
        status = "equal" if _same(h, e, direction) else "mismatch"
        dt = str(h.dtype) if h.dtype == e.dtype else f"{e.dtype}->{h.dtype}" if direction == "export" else \
            f"{h.dtype}->{e.dtype}"
        rep.checks.append(TensorCheck(name, owner.get(name), list(h.shape), dt.replace("torch.", ""), status, diff))
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


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@contextmanager
def _scoped_dist_env():
    """Restore the torch.distributed rendezvous variables Lightning sets for its single-process group.

    Lightning exports MASTER_ADDR/MASTER_PORT into os.environ and the c10d TCPStore keeps listening on that port
    after the group is destroyed, so a child process started later by the caller (e.g. `ellama pretrain` launched
    from the same Python process) would inherit a port that is in use (EADDRINUSE).
    """
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def llama31_config_from_hf(cfg: dict, generation_config=None):
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
        generation_config=generation_config,
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


def _norm_cast_transforms(io, target_module, pairs: list[tuple[str, str]]):
    """RMSNorm mappings as transforms that keep the target parameter's dtype.

    megatron's TE-free RMSNorm (torch.nn.RMSNorm in WrappedTorchNorm) is created in float32 whatever
    params_dtype is, while TE's fused norm and HF's follow params_dtype. NeMo's apply_transforms asserts that no
    target dtype changes, so a bf16 HF norm must be widened (exact) on import and an fp32 engine norm rounded to
    the export dtype on export. ``pairs`` are (source pattern, target pattern); the dtype is taken from the
    first target parameter matching the pattern's suffix.
    """
    params = dict(target_module.named_parameters())
    transforms = []
    for src, dst in pairs:
        suffix = dst.split("*")[-1]
        dtype = next((p.dtype for k, p in params.items() if k.endswith(suffix)), None)

        transforms.append(io.state_transform(source_key=src, target_key=dst, fn=_caster(dtype)))
    return transforms


def _caster(dtype):
    # one positional parameter: NeMo's StateDictTransform matches fn parameters to source keys
    def cast(weight: torch.Tensor) -> torch.Tensor:
        return weight if dtype is None else weight.to(dtype)

    return cast


SOURCE_CONFIG_NAME = "ellama_source_config.json"


def _importer_class():
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, LlamaModel
    from nemo.lightning import io

    class EllamaHFLlamaImporter(HFLlamaImporter):
        """HFLlamaImporter with a complete config, a private tokenizer stage dir and spec-aware norm names."""

        hf_config: dict = {}
        stage_dir: str = ""
        norm_mapping: str = "auto"

        def init(self) -> LlamaModel:
            return LlamaModel(self.config, tokenizer=self.tokenizer)

        @property
        def config(self):
            from transformers import GenerationConfig

            gen = None
            if (Path(str(self)) / "generation_config.json").is_file():
                gen = GenerationConfig.from_pretrained(str(self))
            return llama31_config_from_hf(self.hf_config, generation_config=gen)

        def nemo_setup(self, model, trainer=None, *args, **kwargs):
            # Synchronous save: the async writer spawns a process (needs __main__ guards) and calls
            # torch.cuda.synchronize() in megatron.core.dist_checkpointing.strategies.filesystem_async.
            kwargs.setdefault("ckpt_async_save", False)
            return super().nemo_setup(model, trainer, *args, **kwargs)

        def save_hf_tokenizer_assets(self, tokenizer_name_or_path, save_path=None):
            path = super().save_hf_tokenizer_assets(tokenizer_name_or_path, save_path=self.stage_dir)
            # The tokenizer dir travels into every checkpoint's context/ (trainer checkpoints too), so the source's
            # HF config rides along: export needs max_position_embeddings, which NeMo conflates with the training
            # seq_length (a CPT run at 8192 would otherwise export a 131072-context model as 8192).
            (Path(path) / SOURCE_CONFIG_NAME).write_text(json.dumps(self.hf_config, indent=2))
            return path

        def convert_state(self, source, target):
            from nemo.collections.llm.gpt.model.llama import TransformFns

            target_keys = set((target.module if hasattr(target, "module") else target).state_dict())
            te = any(k.endswith(TE_NORM_NAMES["input"]) for k in target_keys)
            # "nemo-2.7.3" reproduces upstream's mapping (always TE names) so tests can show verification catching it.
            names = TE_NORM_NAMES if (te or self.norm_mapping == "nemo-2.7.3") else LOCAL_NORM_NAMES
            mapping = {
                "model.embed_tokens.weight": "embedding.word_embeddings.weight",
                "model.layers.*.self_attn.o_proj.weight": "decoder.layers.*.self_attention.linear_proj.weight",
                "model.layers.*.mlp.down_proj.weight": "decoder.layers.*.mlp.linear_fc2.weight",
                "lm_head.weight": "output_layer.weight",
            }
            if getattr(source.config, "tie_word_embeddings", False):
                del mapping["lm_head.weight"]
            tmod = target.module if hasattr(target, "module") else target
            transforms = _norm_cast_transforms(io, tmod, [
                ("model.layers.*.input_layernorm.weight", "decoder.layers.*." + names["input"]),
                ("model.layers.*.post_attention_layernorm.weight", "decoder.layers.*." + names["post_attention"]),
                ("model.norm.weight", "decoder.final_layernorm.weight"),
            ]) + [
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


def import_hf_to_engine(hf_dir: Path, out: Path, *, norm_mapping: str = "auto") -> VerifyReport:
    """Convert an HF Llama 3.1 directory into a NeMo 2 checkpoint at ``out`` and verify every tensor.

    ``out`` must not exist. Raises UserError (after removing ``out``) if verification finds unmapped or
    mismatched tensors. ``norm_mapping="nemo-2.7.3"`` uses NeMo's own (TE-only) RMSNorm names, to demonstrate
    that verification catches the upstream silent loss; "auto" (default) picks the names the model has.
    """
    if norm_mapping not in ("auto", "nemo-2.7.3"):
        raise ValueError(f"norm_mapping must be 'auto' or 'nemo-2.7.3', not {norm_mapping!r}")
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
        importer.norm_mapping = norm_mapping
        with _scoped_dist_env():
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


# ----------------------------------------------------------------------------------------------------------------
# Export through NeMo's exporter, plus the engine's own forward pass for the logits check.
# ----------------------------------------------------------------------------------------------------------------


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


def load_engine_model(ckpt: Path):
    """(LightningModule, trainer) for a NeMo 2 checkpoint on this host (CPU when there is no GPU)."""
    from nemo.lightning import MegatronStrategy, Trainer, _strategy_lib

    from ellama_recipes.engine import cpu_compat

    cpu_compat.apply_conversion_redirects()
    model = load_model_context(ckpt, "model")
    model.config.fp8 = None
    model.config.fp8_param = False
    model.config.perform_initialization = False
    if getattr(model, "model_transform", None) is not None:
        raise UserError(f"{ckpt} is a PEFT/adapter checkpoint; merge the adapters before exporting.")
    cpu = _cpu_only()
    trainer = Trainer(
        devices=1, accelerator="cpu" if cpu else "gpu",
        strategy=MegatronStrategy(ddp="pytorch", setup_optimizers=False),
        logger=False, enable_checkpointing=False,
    )
    from lightning.pytorch.trainer.states import TrainerFn

    # Inference-only: TESTING skips MegatronParallel.init_ddp, which needs torch.cuda.Stream (and a DDP wrapper
    # this read-only load does not use).
    trainer.state.fn = TrainerFn.TESTING
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    if not model.state_dict():
        if cpu:
            with _strategy_lib.megatron_cpu_init_context(model.config):
                model.configure_model()
        else:
            model.configure_model()
    trainer.strategy.setup(trainer)
    try:
        trainer.strategy.load_checkpoint(Path(ckpt))
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as exc:
        # megatron.core.dist_checkpointing raises CheckpointingException (a RuntimeError) for missing or mis-shaped
        # tensors; torch DCP raises RuntimeError/ValueError/KeyError for unreadable shards.
        raise UserError(
            f"Loading {ckpt} into the model its context describes failed ({type(exc).__name__}: {exc}). The "
            "checkpoint is partial, corrupt, or its weights do not match its context/; use an intact checkpoint."
        ) from exc
    return model, trainer


def _mcore_gpt(model):
    from megatron.core.models.gpt import GPTModel

    m = model
    for _ in range(6):
        if isinstance(m, GPTModel):
            return m
        m = getattr(m, "module", None)
        if m is None:
            break
    raise RuntimeError(f"no megatron GPTModel inside {type(model).__name__}")


def fixed_batch(vocab_size: int, seq_length: int) -> torch.Tensor:
    """The fixed batch the logits check uses: 2 x min(32, seq) token ids from a seeded generator."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, min(32, seq_length)), generator=g)


@torch.no_grad()
def engine_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The engine's own forward pass (megatron GPTModel), in float32, on CPU or the current GPU."""
    gpt = _mcore_gpt(model)
    gpt.eval()
    if _cpu_only():
        # megatron's DotProductAttention forks the 'model-parallel-rng' CUDA RNG state even in eval; on CPU the
        # strategy never registers it. The inference tracker's fork is a no-op (no dropout at eval anyway).
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    dev = next(gpt.parameters()).device
    orig_dtype = next(gpt.parameters()).dtype
    gpt.float()
    b, s = input_ids.shape
    ids = input_ids.to(dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    # TE-free DotProductAttention needs an explicit causal mask (True = masked); TE's fused attention builds its
    # own from attn_mask_type=causal and is given none, as in megatron's own training/inference paths.
    mask = None if have_transformer_engine() else \
        torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), diagonal=1)[None, None]
    out = gpt(input_ids=ids, position_ids=pos, attention_mask=mask)
    gpt.to(orig_dtype)
    return out.float().cpu()


def _exporter_class():
    from nemo.collections.llm.gpt.model.llama import HFLlamaExporter, TransformFns
    from nemo.lightning import io

    class EllamaHFLlamaExporter(HFLlamaExporter):
        """HFLlamaExporter with spec-aware norm names, no swallowed tokenizer errors, and the engine logits."""

        engine_batch_logits: torch.Tensor | None = None
        batch: torch.Tensor | None = None

        def apply(self, output_path: Path) -> Path:
            source, trainer = load_engine_model(Path(str(self)))
            try:
                return self._convert_and_save(source, output_path)
            finally:
                from nemo.lightning import teardown

                # destroys the process group / model-parallel state so later work in this process starts clean
                teardown(trainer, source)

        def _convert_and_save(self, source, output_path: Path) -> Path:
            from nemo.collections.llm.gpt.model.base import torch_dtype_from_mcore_config

            target = self.init(torch_dtype_from_mcore_config(source.config))
            target = self.convert_state(source, target, source.config)
            hf_cfg = self.config
            self.batch = fixed_batch(hf_cfg.vocab_size, source.config.seq_length)
            self.engine_batch_logits = engine_logits(source, self.batch)
            target = target.cpu()
            gen = getattr(source.config, "generation_config", None)
            if gen is not None:
                target.generation_config = gen
            if hf_cfg.tie_word_embeddings:
                sd = target.state_dict()
                sd.pop("lm_head.weight")
                target.save_pretrained(output_path, state_dict=sd, safe_serialization=True)
            else:
                target.save_pretrained(output_path, safe_serialization=True)
            tok = getattr(self.tokenizer, "tokenizer", None)
            if tok is None or not hasattr(tok, "save_pretrained"):
                raise UserError(
                    f"The checkpoint's tokenizer ({type(self.tokenizer).__name__}) is not a Hugging Face tokenizer, "
                    "so the export would have no tokenizer files. Import the base with `ellama import-hf`."
                )
            src_dir = Path(getattr(tok, "name_or_path", "") or "/nonexistent")
            if (src_dir / "tokenizer_config.json").is_file():
                # The files the importer staged verbatim from the HF source (special tokens, chat template intact);
                # re-saving through NeMo's wrapper would add cls/sep tokens and change decoding options.
                for f in src_dir.iterdir():
                    if f.is_file() and f.name != SOURCE_CONFIG_NAME:
                        shutil.copy2(f, Path(output_path) / f.name)
            else:
                tok.save_pretrained(output_path)
            return output_path

        def convert_state(self, source, target, source_config=None):
            keys = set(_mcore_gpt(source).state_dict())
            names = TE_NORM_NAMES if any(k.endswith(TE_NORM_NAMES["input"]) for k in keys) else LOCAL_NORM_NAMES
            mapping = {
                "decoder.layers.*.self_attention.linear_proj.weight": "model.layers.*.self_attn.o_proj.weight",
                "decoder.layers.*.mlp.linear_fc2.weight": "model.layers.*.mlp.down_proj.weight",
            }
            transforms = _norm_cast_transforms(io, target, [
                ("decoder.layers.*." + names["input"], "model.layers.*.input_layernorm.weight"),
                ("decoder.layers.*." + names["post_attention"], "model.layers.*.post_attention_layernorm.weight"),
                ("decoder.final_layernorm.weight", "model.norm.weight"),
            ]) + [
                io.state_transform(
                    source_key="decoder.layers.*.self_attention.linear_qkv.weight",
                    target_key=("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
                                "model.layers.*.self_attn.v_proj.weight"),
                    fn=TransformFns.split_qkv,
                ),
                io.state_transform(
                    source_key="decoder.layers.*.mlp.linear_fc1.weight",
                    target_key=("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"),
                    fn=TransformFns.split_fc1,
                ),
                io.state_transform(
                    source_key="embedding.word_embeddings.weight", target_key="model.embed_tokens.weight",
                    fn=TransformFns.prune_padding,
                ),
            ]
            if not self.config.tie_word_embeddings:
                transforms.append(io.state_transform(
                    source_key="output_layer.weight", target_key="lm_head.weight", fn=TransformFns.prune_padding))
            return io.apply_transforms(source, target, mapping=mapping, transforms=transforms)

        @property
        def tokenizer(self):
            return load_model_context(Path(str(self)), "model.tokenizer")

        @property
        def config(self):
            cfg = super().config
            src = load_model_context(Path(str(self)), "model.config")
            cfg.torch_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(src.params_dtype, "float32")
            tok_dir = Path(getattr(getattr(self.tokenizer, "tokenizer", None), "name_or_path", "") or "/nonexistent")
            if (tok_dir / SOURCE_CONFIG_NAME).is_file():
                source_cfg = json.loads((tok_dir / SOURCE_CONFIG_NAME).read_text())
                cfg.max_position_embeddings = source_cfg.get("max_position_embeddings", cfg.max_position_embeddings)
                # Llama 3.1 Instruct lists several eos ids (<|end_of_text|>, <|eom_id|>, <|eot_id|>); keep them
                for key in ("bos_token_id", "eos_token_id"):
                    if source_cfg.get(key) is not None:
                        setattr(cfg, key, source_cfg[key])
            return cfg

    return EllamaHFLlamaExporter


def export_engine_to_hf(ckpt: Path, out: Path) -> dict:
    """Run NeMo's (fixed) HF exporter from ``ckpt`` into the existing empty dir ``out``.

    Returns ``{"batch": input ids, "engine_logits": the engine's logits on them}`` for :func:`compare_logits`.
    """
    cls = _exporter_class()
    exporter = cls(str(Path(ckpt).resolve()))
    with _scoped_dist_env():
        exporter.apply(Path(out))
    return {"batch": exporter.batch, "engine_logits": exporter.engine_batch_logits}


def _shape_from_hf_dir(hf_dir: Path) -> Shape:
    return Shape.from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))


def verify_export_tensors(ckpt: Path, hf_dir: Path) -> VerifyReport:
    """Every engine tensor maps to exactly one HF tensor, bit-exact; no HF tensor without an engine source."""
    s = _shape_from_hf_dir(hf_dir)
    engine = read_engine_weights(ckpt)
    as_hf, table = engine_tensors_as_hf(engine, s)
    owner = {h: e for e, hs in table.items() for h in hs}
    hf = read_hf_weights(hf_dir)
    return compare_hf_vs_engine(hf, as_hf, owner, direction="export")


# float32 on both sides; the remaining differences come from op order (megatron's fused QKV GEMM and
# fc1 GEMM vs three/two separate HF GEMMs, different softmax/RMSNorm kernels): ~1e-6 relative in practice.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4


@torch.no_grad()
def compare_logits(engine_out: dict, hf_dir: Path) -> dict:
    """Reload the export with transformers (float32) and compare logits with the engine's on the fixed batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    model.eval()
    ids = engine_out["batch"]
    hf_logits = model(input_ids=ids).logits.float()
    eng = engine_out["engine_logits"][..., : hf_logits.shape[-1]]
    if eng.shape != hf_logits.shape:
        return {"max_logit_diff": float("inf"), "logit_tolerance": LOGIT_ATOL, "logits_ok": False,
                "logit_shapes": [list(eng.shape), list(hf_logits.shape)]}
    diff = (eng - hf_logits).abs()
    tol = LOGIT_ATOL + LOGIT_RTOL * hf_logits.abs()
    return {
        "max_logit_diff": diff.max().item(),
        "logit_tolerance": LOGIT_ATOL,
        "logit_rtol": LOGIT_RTOL,
        "logits_ok": bool((diff <= tol).all()),
        "batch_shape": list(ids.shape),
        "argmax_agreement": (eng.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
    }


def export_mapping_table(ckpt: Path) -> list[dict]:
    """The dry-run table: engine name -> HF name, shape, dtype (from checkpoint metadata; no tensors loaded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    cfg = load_model_context(ckpt, "model.config")
    tok = load_model_context(ckpt, "model.tokenizer")
    if not hasattr(getattr(tok, "tokenizer", None), "save_pretrained"):
        raise UserError(
            f"{ckpt} carries a {type(tok).__name__}, not a Hugging Face tokenizer, so an export would have no "
            "tokenizer files (a run started without --from?). Export runs that continued from `ellama import-hf`."
        )
    s = Shape(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=tok.vocab_size, tie_word_embeddings=cfg.share_embeddings_and_output_weights,
    )
    try:
        meta = dcp.FileSystemReader(str(Path(ckpt) / "weights")).read_metadata()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"Cannot read {ckpt}/weights metadata ({exc}); the checkpoint is partial or corrupt.") from exc
    shapes: dict[str, tuple[list[int], str]] = {}
    for key, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or not key.startswith("module.") or key.endswith("_extra_state"):
            continue
        k = key[len("module."):]
        size, dt = list(md.size), str(md.properties.dtype).replace("torch.", "")
        if k.startswith("decoder.layers.") and not k.split(".")[2].isdigit():
            for i in range(size[0]):
                shapes[f"decoder.layers.{i}.{k[len('decoder.layers.'):]}"] = (size[1:], dt)
        else:
            shapes[k] = (size, dt)
    check_engine_shapes(shapes, s, ffn_hidden_size=cfg.ffn_hidden_size, where=Path(ckpt))
    table = engine_to_hf_table(shapes, s)
    rows = []
    hd, h = s.head_dim, s.hidden_size
    for key in sorted(table, key=_natural):
        size, dt = shapes[key]
        for j, hf in enumerate(table[key]):
            if key.endswith("linear_qkv.weight"):
                shp = [(s.num_attention_heads if j == 0 else s.num_query_groups) * hd, h]
            elif key.endswith("linear_fc1.weight"):
                shp = [size[0] // 2, size[1]]
            elif key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                shp = [s.vocab_size, size[1]]
            else:
                shp = size
            rows.append({"engine": key, "hf": hf, "engine_shape": size, "shape": shp, "dtype": dt})
    return rows


def check_engine_shapes(shapes: dict[str, tuple[list[int], str]], s: Shape, *, ffn_hidden_size: int,
                        where: Path) -> None:
    """Every tensor a Llama of this config needs is in the checkpoint, with the right shape (from metadata)."""
    names = TE_NORM_NAMES if any(k.endswith(TE_NORM_NAMES["input"]) for k in shapes) else LOCAL_NORM_NAMES
    h, hd, f = s.hidden_size, s.head_dim, ffn_hidden_size
    want: dict[str, list[int] | None] = {"embedding.word_embeddings.weight": None, "decoder.final_layernorm.weight": [h]}
    if not s.tie_word_embeddings:
        want["output_layer.weight"] = None
    for i in range(s.num_layers):
        p = f"decoder.layers.{i}."
        want[p + "self_attention.linear_qkv.weight"] = [(s.num_attention_heads + 2 * s.num_query_groups) * hd, h]
        want[p + "self_attention.linear_proj.weight"] = [h, s.num_attention_heads * hd]
        want[p + "mlp.linear_fc1.weight"] = [2 * f, h]
        want[p + "mlp.linear_fc2.weight"] = [h, f]
        want[p + names["input"]] = [h]
        want[p + names["post_attention"]] = [h]
    problems = []
    for key, shp in want.items():
        if key not in shapes:
            problems.append(f"{key}: missing from the checkpoint")
            continue
        got = list(shapes[key][0])
        if shp is None:  # vocab-sized: Megatron may pad rows, never fewer than the tokenizer's
            if len(got) != 2 or got[1] != h or got[0] < s.vocab_size:
                problems.append(f"{key}: shape {got}, expected [>= {s.vocab_size}, {h}]")
        elif got != shp:
            problems.append(f"{key}: shape {got}, expected {shp} from the checkpoint's config")
    if problems:
        raise UserError(
            f"{where} does not hold a complete Llama model matching its own config "
            f"({s.num_layers} layers, hidden {h}, {s.num_attention_heads} heads / {s.num_query_groups} KV groups, "
            f"vocab {s.vocab_size}); exporting it would drop or misplace tensors. Use an intact checkpoint.",
            problems=problems,
        )


def _natural(k: str):
    return [int(p) if p.isdigit() else p for p in k.split(".")]
