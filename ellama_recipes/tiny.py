"""Build the `tiny` base model locally: a Llama-3.1-architecture HF checkpoint with random weights.

It stands in for meta-llama/Llama-3.1-8B in tests and the quickstart, so it has every architectural feature the
real models have and the converters must handle: grouped-query attention, llama3 RoPE scaling, untied output
layer, RMSNorm weights (randomised, so a converter that drops them is caught), a byte-level BPE tokenizer with the
Llama 3 special tokens and chat template (ellama_recipes.data.tokenizer_train, trained on the bundled sample
data), and ``vocab_size == len(tokenizer)``.

    ellama import-hf --size tiny --out checkpoints/tiny      # builds this model, then imports it

Python::

    from ellama_recipes.tiny import build_tiny_base
    hf_dir = build_tiny_base(Path("tiny-hf"))
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ellama_recipes.errors import UserError
from ellama_recipes.sizes import SIZES, Architecture

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def train_tiny_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """The project tokenizer (Llama 3 special tokens + chat template) trained on the bundled sample data."""
    from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer

    return Path(train_tokenizer(sample_texts(), out_dir, vocab_size=vocab_size))


def hf_config(arch: Architecture, *, bos_token_id: int | None, eos_token_id: int | None, dtype: str = "float32"):
    """transformers.LlamaConfig for a Llama-3.1-architecture model (GQA, llama3 RoPE scaling)."""
    from transformers import LlamaConfig

    if arch.hidden_size % arch.num_attention_heads or arch.num_attention_heads % arch.num_query_groups:
        raise UserError(
            f"Architecture {arch} is not a valid Llama shape: hidden_size must be divisible by num_attention_heads "
            "and num_attention_heads by num_query_groups."
        )
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=arch.norm_eps,
        rope_theta=arch.rope_theta,
        rope_scaling={
            "rope_type": "llama3",
            "factor": arch.rope_scaling_factor,
            "low_freq_factor": arch.low_freq_factor,
            "high_freq_factor": arch.high_freq_factor,
            "original_max_position_embeddings": arch.original_max_position_embeddings,
        },
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype=dtype,
    )


def build_tiny_base(
    out_dir: Path,
    *,
    seed: int = 0,
    randomize_norms: bool = True,
    arch: Architecture | None = None,
    tokenizer_dir: Path | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight HF LlamaForCausalLM + tokenizer to ``out_dir`` (atomically) and return it.

    ``arch`` defaults to ``SIZES["tiny"].arch``; any Llama-3.1-architecture shape works. The tokenizer is copied
    from ``tokenizer_dir`` if given (its length must equal ``arch.vocab_size``), else trained with exactly
    ``arch.vocab_size`` tokens. RMSNorm weights are drawn from U(0.5, 1.5) unless ``randomize_norms`` is False.
    ``dtype`` "bfloat16" stores the weights like the released Llama 3.1 checkpoints (same values, rounded).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    arch = arch or SIZES["tiny"].arch
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"Output directory {out_dir} already exists and is not empty; choose a new --out or delete it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if tokenizer_dir is not None:
            tokenizer_dir = Path(tokenizer_dir)
            if not (tokenizer_dir / "tokenizer.json").exists() and not (tokenizer_dir / "tokenizer_config.json").exists():
                raise UserError(f"No tokenizer files in {tokenizer_dir}; pass a directory with tokenizer.json.")
            for name in _TOKENIZER_FILES:
                if (tokenizer_dir / name).exists():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
        else:
            train_tiny_tokenizer(tmp, arch.vocab_size)
        tok = AutoTokenizer.from_pretrained(tmp)
        if len(tok) != arch.vocab_size:
            raise UserError(
                f"The tokenizer has {len(tok)} tokens but the architecture's vocab_size is {arch.vocab_size}; "
                "they must be equal (export trims the vocabulary to the tokenizer). Use a matching tokenizer or arch."
            )
        if dtype not in ("float32", "bfloat16"):
            raise UserError(f"dtype must be float32 or bfloat16, not {dtype!r}.")
        cfg = hf_config(arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype=dtype)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
        if randomize_norms:
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("norm.weight"):
                        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=True, temperature=0.6, top_p=0.9
        ).save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def arch_from_hf_config(cfg: dict) -> Architecture:
    """Architecture of an HF Llama config.json dict (used to describe a --from directory)."""
    rs = cfg.get("rope_scaling") or {}
    return Architecture(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 131072),
        rope_theta=cfg.get("rope_theta", 500000.0),
        rope_scaling_factor=rs.get("factor", 8.0),
        low_freq_factor=rs.get("low_freq_factor", 1.0),
        high_freq_factor=rs.get("high_freq_factor", 4.0),
        original_max_position_embeddings=rs.get("original_max_position_embeddings", 8192),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise UserError(f"{hf_dir} has no config.json; --from must be a Hugging Face model directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-download the model.") from exc
