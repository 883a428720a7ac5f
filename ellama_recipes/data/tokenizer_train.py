"""Train a small Llama-3-style byte-level BPE tokenizer (for the ``tiny`` size and tests).

The result is a Hugging Face fast-tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json``) that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads, with:

- Llama 3's pre-tokenizer split regex and byte-level BPE (every byte is in the base alphabet: no unknown tokens);
- Llama 3.1's special tokens after the regular vocabulary, in Llama 3's order: ``<|begin_of_text|>`` (bos),
  ``<|end_of_text|>`` (eos), ``<|finetune_right_pad_id|>`` (pad), ``<|start_header_id|>``, ``<|end_header_id|>``,
  ``<|eom_id|>``, ``<|eot_id|>``, ``<|python_tag|>``; reserved special tokens fill up to the exact size;
- a BOS-prepending post-processor (like Llama 3) and the Llama 3.1 chat template;
- ``len(tokenizer) == vocab_size`` exactly (checked), so a model with ``vocab_size`` embeddings matches.

Python::

    from ellama_recipes.data.tokenizer_train import train_tokenizer, sample_texts
    train_tokenizer(sample_texts(), Path("checkpoints/tok"), vocab_size=4096)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ellama_recipes.errors import UserError

# Llama 3's pre-tokenizer pattern (tiktoken cl100k-style split).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
# Llama 3.1 order of the named special tokens (ids 128000.. in the real model; here right after the regular vocab).
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]

# The Llama 3.1 Instruct chat format (system header with knowledge cutoff and date, role headers, <|eot_id|> after
# each turn, ipython role for tool output, optional generation prompt). Written for this project; renders plain
# conversations byte-identically to Meta's template.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{%- if builtin_tools is defined or tools is defined and tools is not none %}{{- \"Environment: ipython\\n\" }}{%- endif %}"
    "{%- if builtin_tools is defined %}{{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\" }}{%- endif %}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' or message['role'] == 'ipython' %}"
    "{{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}"
    "{%- if message['content'] is mapping %}{{- message['content'] | tojson }}{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- \"<|eot_id|>\" }}"
    "{%- else %}"
    "{{- \"<|start_header_id|>\" + message['role'] + \"<|end_header_id|>\\n\\n\" + message['content'] | trim + \"<|eot_id|>\" }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- \"<|start_header_id|>assistant<|end_header_id|>\\n\\n\" }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 4096) -> Path:
    """Train the byte-level BPE on ``texts`` and save an HF tokenizer directory at ``out_dir``.

    ``len(AutoTokenizer.from_pretrained(out_dir)) == vocab_size`` exactly; deterministic for the same texts.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special + 1:
        raise UserError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {256 + n_special + 1} "
                        "(256 bytes + special tokens + 1 merge). Use e.g. --vocab-size 4096.")
    tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    n_texts = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts
        for t in texts:
            n_texts += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise UserError("No training text was given to the tokenizer trainer. Pass a non-empty corpus.")
    regular = tok.get_vocab_size()
    # Fill any shortfall (small corpora run out of merges) with Llama-3-style reserved special tokens, then the
    # named specials, so the total is exact. Llama 3 interleaves reserved ids among the named ones; we keep the
    # named ones contiguous and put reserved ones first.
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(vocab_size - n_special - regular)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved + SPECIAL_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"tokenizer size {tok.get_vocab_size(with_added_tokens=True)} != {vocab_size}")

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {}
    for t in reserved + SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLAMA31_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    return out_dir


def sample_texts() -> Iterator[str]:
    """Texts of the bundled sample, deterministic order: serialized domain records (products with their reviews and
    articles, the way ``serialize`` renders them, HTML stripped) then the general documents."""
    from ellama_recipes.data.bundled import sample_dir
    from ellama_recipes.data.clean import iter_jsonl_texts

    root = sample_dir()
    for sub in ("domain", "general"):
        for path in sorted((root / sub).glob("*.jsonl")):
            yield from iter_jsonl_texts(path)
