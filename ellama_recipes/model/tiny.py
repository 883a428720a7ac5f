"""Build the `tiny` base model locally: a Llama-3.1-architecture HF checkpoint with random weights.

It stands in for meta-llama/Llama-3.1-8B in tests and the quickstart, so it has every architectural feature the
real models have and the converters must handle: grouped-query attention, llama3 RoPE scaling, untied output
layer, RMSNorm weights (randomised, so a converter that drops them is caught), a byte-level BPE tokenizer with the
Llama 3 special tokens and chat template (ellama_recipes.data.tokenizer_train, trained on the bundled sample
data), and ``vocab_size == len(tokenizer)``.

    ellama import-hf --size tiny --out checkpoints/tiny      # builds this model, then imports it

Python::

    from ellama_recipes.model.tiny import build_tiny_base
    hf_dir = build_tiny_base(Path("tiny-hf"))

A random-init base makes "general regression" meaningless, so the quickstart uses :func:`trained_tiny_base`: the
same model after a short pretraining on the *train* part of the bundled general sample (plain torch, one intra-op
thread, peak LR :data:`TINY_BASE_MAX_LR` with warmup + cosine; :func:`split_general_documents` holds every 10th document
of each file out, for evaluation), cached under ``$ELLAMA_CACHE`` (default ``~/.cache/ellama-recipes``) keyed by the
architecture, the training settings and the bundled sample's bytes. Continued pretraining then adds the domain.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ellama_recipes.errors import UserError
from ellama_recipes.io.atomic import atomic_dir
from ellama_recipes.model import architecture
from ellama_recipes.model.architecture import Architecture
from ellama_recipes.model.sizes import SIZES

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
    """transformers.LlamaConfig for a Llama-3.1-architecture model (GQA, llama3 RoPE scaling): the bridge's HF keys
    (:func:`ellama_recipes.model.architecture.to_hf`) plus the token ids, the init range and the dtype."""
    from transformers import LlamaConfig

    if arch.hidden_size % arch.num_attention_heads or arch.num_attention_heads % arch.num_query_groups:
        raise UserError(
            f"Architecture {arch} is not a valid Llama shape: hidden_size must be divisible by num_attention_heads "
            "and num_attention_heads by num_query_groups."
        )
    fields = {k: v for k, v in architecture.to_hf(arch).items() if k != "model_type"}
    return LlamaConfig(**fields, initializer_range=0.02, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       torch_dtype=dtype)


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
    # an empty existing folder is replaced; the model appears there only once it is complete (io.atomic)
    with atomic_dir(out_dir, replace=True) as tmp:
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
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# A tiny base that has learned general text
# ---------------------------------------------------------------------------------------------------------------------
BASE_PRETRAIN_VERSION = 3  # bump when the training below changes (invalidates the cache)
# The tiny base's own peak LR. The size row's base_max_lr (1e-2, what CPT's "10 % of the base LR" derives from) is
# too high for a short run: at 80 steps (batch 16 x 256) it left the held-out general perplexity at 51, 3e-3 at 5.6
# (docs/quickstart.md). CPT's 1e-3 is then a third of the peak the base actually trained at.
TINY_BASE_MAX_LR = 3e-3
TINY_BASE_STEPS = 80  # the quickstart's base: ~1.2 passes over the 3,042 training documents


HELDOUT_EVERY = 10  # every 10th document of each bundled general file is held out for evaluation


def general_documents() -> list[dict]:
    """Every bundled general document: ``{"id": "<file>:<line>", "file", "line", "lang", "text"}`` (line: 1-based)."""
    from ellama_recipes.data.bundled import sample_dir

    docs = []
    for path in sorted((sample_dir() / "general").glob("*.jsonl")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                docs.append({"id": f"{path.name}:{i}", "file": path.name, "line": i,
                             "lang": rec.get("lang") or "und", "text": rec["text"]})
    return docs


def split_general_documents(every: int = HELDOUT_EVERY) -> dict[str, list[dict]]:
    """The bundled general documents split in two: ``train`` (what the tiny base pretrains on, and what continued
    pretraining replays) and ``heldout`` (every ``every``-th document of each file, by its rank in the file: what
    general ability is measured on; neither the base nor continued pretraining ever trains on it)."""
    split: dict[str, list[dict]] = {"train": [], "heldout": []}
    rank: dict[str, int] = {}
    for d in general_documents():
        rank[d["file"]] = rank.get(d["file"], 0) + 1
        split["heldout" if rank[d["file"]] % every == 0 else "train"].append(d)
    return split


def split_rule(every: int = HELDOUT_EVERY) -> str:
    return (f"bundled general sample (en, de, fr, es): documents 1..N of each file; every {every}th "
            f"(rank % {every} == 0) is held out for evaluation, the rest train the base")


def _general_texts() -> list[str]:
    """The general documents the tiny base trains on (the ``train`` part of :func:`split_general_documents`)."""
    return [d["text"] for d in split_general_documents()["train"]]


def pretrain_tiny_base(
    hf_dir: Path, texts: list[str], *, steps: int = TINY_BASE_STEPS, seq_length: int = 256, batch_size: int = 16,
    max_lr: float | None = None, seed: int = 0, echo: Callable[[str], None] | None = None, threads: int | None = 1,
    documents: list[str] | None = None,
) -> dict:
    """Train the HF model in ``hf_dir`` in place on ``texts`` (packed ``bos text eos`` streams, next-token loss).

    AdamW (0.9, 0.95), weight decay 0.1, grad clip 1.0, linear warmup over 10% of the steps then cosine decay to
    10% of ``max_lr`` (default :data:`TINY_BASE_MAX_LR`; the size row's base max LR is too high for so few steps).
    ``threads``: torch's intra-op threads during this training (default 1: on a small shared machine one thread
    slows down under load far less than all cores do, like the engine stages; None keeps torch's setting).
    ``documents``: the ids of ``texts``, recorded so the evaluation can prove it never measures them.
    Returns the training record (also written to ``hf_dir/ellama_base_pretrain.json``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    max_lr = TINY_BASE_MAX_LR if max_lr is None else max_lr
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    stream: list[int] = []
    for ids in tok(texts)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    n = len(stream) // seq_length
    if n < batch_size:
        raise UserError(f"Only {len(stream)} tokens of text to pretrain the tiny base on; need at least "
                        f"{batch_size * seq_length}.")
    data = torch.tensor(stream[: n * seq_length]).view(n, seq_length)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=max_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 10)

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    order = torch.randperm(n, generator=gen)
    losses, t0 = [], time.perf_counter()
    model.train()
    try:
        _train_loop(model, data, opt, sched, order, gen, steps, batch_size, n, losses, echo)
    finally:
        torch.set_num_threads(prev_threads)
    model.eval()
    model.save_pretrained(hf_dir, safe_serialization=True)
    record = {"steps": steps, "seq_length": seq_length, "batch_size": batch_size, "max_lr": max_lr,
              "tokens_seen": steps * batch_size * seq_length, "corpus_tokens": len(stream),
              "first_loss": losses[0], "last_loss": losses[-1], "seconds": time.perf_counter() - t0,
              "threads": threads or prev_threads, "data": split_rule() if documents is not None else "given texts",
              "documents": len(texts), "document_ids": documents}
    (Path(hf_dir) / "ellama_base_pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _train_loop(model, data, opt, sched, order, gen, steps, batch_size, n, losses, echo) -> None:
    import torch

    pos = 0
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        x = data[order[pos: pos + batch_size]]
        pos += batch_size
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if echo and (step % 25 == 0 or step == steps - 1):
            echo(f"[tiny base] step {step + 1}/{steps} loss {losses[-1]:.3f}")


def cache_root() -> Path:
    return Path(os.environ.get("ELLAMA_CACHE") or Path.home() / ".cache" / "ellama-recipes")


def trained_tiny_base(out_dir: Path, *, steps: int = TINY_BASE_STEPS, seed: int = 0, cache: bool = True,
                      echo: Callable[[str], None] | None = None) -> Path:
    """:func:`build_tiny_base` + :func:`pretrain_tiny_base` on the bundled general sample, copied to ``out_dir``.

    The result is cached (``cache_root()/tiny-base-<key>``); the key covers everything that changes the weights.
    """
    from ellama_recipes.io.atomic import atomic_dir
    from ellama_recipes.data.bundled import sample_dir

    arch = SIZES["tiny"].arch
    h = hashlib.sha256(json.dumps({"arch": arch.__dict__, "steps": steps, "seed": seed,
                                   "version": BASE_PRETRAIN_VERSION}, sort_keys=True, default=str).encode())
    for path in sorted(sample_dir().glob("*/*.jsonl")):
        if path.parent.name in ("domain", "general"):  # the tokenizer trains on both, the model on general
            h.update(path.name.encode())
            h.update(path.read_bytes())
    cached = cache_root() / f"tiny-base-{h.hexdigest()[:16]}"
    if not (cache and (cached / "ellama_base_pretrain.json").is_file()):
        target = cached if cache else Path(out_dir)
        with atomic_dir(target, replace=True) as tmp:
            build_tiny_base(tmp / "m", arch=arch, seed=seed)
            train = split_general_documents()["train"]
            pretrain_tiny_base(tmp / "m", [d["text"] for d in train], steps=steps, seed=seed, echo=echo,
                               documents=[d["id"] for d in train])
            for child in (tmp / "m").iterdir():
                child.rename(tmp / child.name)
            (tmp / "m").rmdir()
        if not cache:
            return Path(out_dir)
    elif echo:
        echo(f"[tiny base] reusing the cached pretrained base {cached}")
    with atomic_dir(Path(out_dir), replace=False) as tmp:
        for child in cached.iterdir():
            shutil.copy2(child, tmp / child.name)
    return Path(out_dir)
