"""Bundled sample data and the Llama-3-style tokenizer trainer (about 10 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ellama_recipes.data.bundled import sample_dir
from ellama_recipes.data.tokenizer_train import SPECIAL_TOKENS, sample_texts, train_tokenizer
from ellama_recipes.model.sizes import get_size


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jsonl"))}


REPO = Path(__file__).resolve().parent.parent


def _generator():
    """tools/make_sample.py (not part of the installed package), loaded from the checkout."""
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "tools/make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_generator_is_deterministic_and_matches_bundled(tmp_path):
    _generator().generate(tmp_path)
    made = _digest(tmp_path)  # domain/, general/, bad/ (other tools write other folders of sample_data/)
    assert {k.split("/")[0] for k in made} == {"domain", "general", "bad"}
    bundled = {k: v for k, v in _digest(sample_dir()).items() if k.split("/")[0] in ("domain", "general", "bad")}
    assert made == bundled, \
        "bundled sample_data differs from `python tools/make_sample.py`; regenerate and commit it"


def test_sample_data_is_package_data_and_generator_is_not(tmp_path):
    """The wheel ships sample_data/ (found through importlib.resources) and no generator code."""
    src = tmp_path / "src"  # build a copy: setuptools writes build/ and *.egg-info next to pyproject.toml
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("ellama_recipes", "tools"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp_path / "dist").glob("ellama_recipes-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    bundled = {str(p.relative_to(sample_dir().parent.parent)) for p in sample_dir().rglob("*.jsonl")}
    assert bundled and bundled <= names, sorted(bundled - names)[:5]
    assert "ellama_recipes/data/bundled.py" in names
    assert not [n for n in names if n.startswith("tools/") or n.endswith("make_sample.py")]


def test_sample_shape():
    root = sample_dir()
    total = sum(p.stat().st_size for d in ("domain", "general", "bad") for p in (root / d).rglob("*") if p.is_file())
    assert 1_000_000 < total < 5_000_000
    products = [json.loads(x) for x in (root / "domain/products.jsonl").read_text().splitlines()]
    ids = {p["id"] for p in products}
    reviews = [json.loads(x) for x in (root / "domain/reviews.jsonl").read_text().splitlines()]
    articles = [json.loads(x) for x in (root / "domain/articles.jsonl").read_text().splitlines()]
    assert all(r["product_id"] in ids for r in reviews)
    assert all(set(a["product_ids"]) <= ids for a in articles)
    assert {p["lang"] for p in products} >= {"en", "de", "fr", "es"}
    general_langs = {p.stem.split("_")[-1] for p in (root / "general").glob("*.jsonl")}
    assert general_langs >= {"en", "de", "fr", "es"}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return train_tokenizer(sample_texts(), tmp_path_factory.mktemp("tok"), vocab_size=get_size("tiny").arch.vocab_size)


def test_tokenizer_loads_with_exact_size_and_llama3_specials(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert len(tok) == get_size("tiny").arch.vocab_size == 4096
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    for t in SPECIAL_TOKENS:
        tid = tok.convert_tokens_to_ids(t)
        assert tid != tok.unk_token_id and tok.decode([tid]) == t
    ids = tok("Die Küche: wireless headphones!")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "Die Küche: wireless headphones!"
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tokenizer_small_corpus_pads_with_reserved_tokens(tmp_path):
    from transformers import AutoTokenizer

    out = train_tokenizer(["tiny corpus, tiny corpus"], tmp_path / "t", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 300
    assert "<|reserved_special_token_0|>" in tok.get_vocab()
