"""The locally built tiny base model (ellama_recipes.model.tiny). No NeMo here: fast (~15 s)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ellama_recipes.errors import UserError
from ellama_recipes.model.sizes import SIZES
from ellama_recipes.model.tiny import build_tiny_base


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "hf")


def test_tiny_is_llama31_shaped(tiny_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_dir / "config.json").read_text())
    arch = SIZES["tiny"].arch
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == arch.num_layers and cfg["hidden_size"] == arch.hidden_size
    assert cfg["num_key_value_heads"] == arch.num_query_groups < cfg["num_attention_heads"]  # GQA
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3", "factor": arch.rope_scaling_factor, "low_freq_factor": arch.low_freq_factor,
        "high_freq_factor": arch.high_freq_factor,
        "original_max_position_embeddings": arch.original_max_position_embeddings,
    }
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == cfg["vocab_size"] == arch.vocab_size
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert cfg["bos_token_id"] == tok.bos_token_id and cfg["eos_token_id"] == tok.eos_token_id
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|start_header_id|>user<|end_header_id|>" in chat and chat.endswith("assistant<|end_header_id|>\n\n")
    assert (tiny_dir / "model.safetensors").exists() and (tiny_dir / "generation_config.json").exists()


def test_tiny_norms_are_randomised_and_seeded(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    w = load_file(str(tiny_dir / "model.safetensors"))
    norms = [k for k in w if k.endswith("norm.weight")]
    assert len(norms) == 2 * SIZES["tiny"].arch.num_layers + 1
    for k in norms:
        assert not torch.all(w[k] == 1.0), f"{k} left at 1.0 hides dropped-norm bugs"
    again = load_file(str(build_tiny_base(tmp_path / "again") / "model.safetensors"))
    assert all(torch.equal(w[k], again[k]) for k in w), "same seed must give the same weights"


def test_other_shape_and_vocab(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = replace(SIZES["tiny"].arch, num_layers=2, hidden_size=96, ffn_hidden_size=200, num_attention_heads=6,
                   num_query_groups=1, vocab_size=3000)
    d = build_tiny_base(tmp_path / "m", arch=arch, seed=3)
    m = AutoModelForCausalLM.from_pretrained(d)
    assert m.config.num_key_value_heads == 1 and m.config.vocab_size == 3000 == len(AutoTokenizer.from_pretrained(d))
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (16, 96)


def test_tokenizer_vocab_mismatch_is_user_error(tiny_dir, tmp_path):
    arch = replace(SIZES["tiny"].arch, vocab_size=5000)
    with pytest.raises(UserError, match="vocab_size is 5000"):
        build_tiny_base(tmp_path / "bad", arch=arch, tokenizer_dir=tiny_dir)
    assert not (tmp_path / "bad").exists()
    assert [p for p in tmp_path.iterdir()] == [], "no temp dir left behind"


def test_refuses_non_empty_output(tiny_dir):
    with pytest.raises(UserError, match="not empty"):
        build_tiny_base(tiny_dir)


def test_trained_tiny_base_learns_general_text_and_is_cached(tmp_path, monkeypatch):
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ellama_recipes.workflows.perplexity import perplexity
    from ellama_recipes.model.tiny import _general_texts, trained_tiny_base

    monkeypatch.setenv("ELLAMA_CACHE", str(tmp_path / "cache"))
    d = trained_tiny_base(tmp_path / "base", steps=8)
    rec = json.loads((d / "ellama_base_pretrain.json").read_text())
    assert rec["steps"] == 8 and rec["tokens_seen"] == 8 * 16 * 256 and rec["last_loss"] < rec["first_loss"]
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    # general text is far more likely under the trained base than under the same model before training
    random_init = build_tiny_base(tmp_path / "random", seed=0, tokenizer_dir=d)
    texts = _general_texts()[-8:]
    tok = AutoTokenizer.from_pretrained(d)
    ppl = {name: perplexity(AutoModelForCausalLM.from_pretrained(p), tok, texts)["ppl"]
           for name, p in (("trained", d), ("random", random_init))}
    assert ppl["trained"] < ppl["random"] / 2, ppl  # ~3x after 8 steps; the quickstart trains 60+
    assert math.isfinite(ppl["trained"])
    # second call: copied from the cache, byte-identical weights, no training
    again = trained_tiny_base(tmp_path / "again", steps=8)
    assert (again / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    assert len(list((tmp_path / "cache").iterdir())) == 1
