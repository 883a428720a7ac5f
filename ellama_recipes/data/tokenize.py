"""Stage 4, tokenize: JSONL documents to a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

CLI: ``ellama data tokenize --input work/general_en.jsonl --tokenizer checkpoints/tok --out data/general_en``

- Tokenizer: a Hugging Face tokenizer directory, or a Hub id (downloaded through huggingface_hub when online).
- Each document becomes ``[bos] + tokens(text) + [eod]`` where eod is the tokenizer's eos (``<|end_of_text|>`` for
  Llama 3): Llama 3's document format. ``--no-bos`` gives ``tokens(text) + [eod]``, byte-identical to what
  Megatron-LM's ``tools/preprocess_data.py --append-eod`` writes with its default HuggingFaceTokenizer (core 0.15).
- Streaming in constant memory: input is read in chunks of ``chunk_docs`` lines; at most ``2 * workers`` chunks are
  in flight; each encoded chunk is written as one batch through :class:`ellama_recipes.data.indexed.TokenWriter`
  (megatron-core's builder; per-document state is 12 bytes).
- ``workers`` = CPU processes that parse JSON and encode (each with Rust-side parallelism off, so N workers use N
  cores); ``workers=1`` encodes in-process.
- Lines that are not valid JSON objects with a non-empty string ``text`` go to the rejects with ``file:line``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ellama_recipes.data.records import BLANK_LINE, EMPTY_TEXT, INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD, WRONG_TYPE, Reject
from ellama_recipes.errors import UserError


@dataclass
class TokenizerInfo:
    json_str: str  # serialized tokenizers.Tokenizer
    bos_id: int | None
    eod_id: int
    vocab_size: int
    name: str


def _special_content(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _load_local_fast(d: Path) -> TokenizerInfo | None:
    """A local HF tokenizer folder read without importing transformers (tokenizer.json + tokenizer_config.json);
    None when the folder is not in that form (then transformers is used)."""
    tj, tc = d / "tokenizer.json", d / "tokenizer_config.json"
    if not (tj.is_file() and tc.is_file()):
        return None
    from tokenizers import Tokenizer

    try:
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(tj))
    except (json.JSONDecodeError, UnicodeDecodeError, Exception) as exc:  # tokenizers raises a bare Exception
        raise UserError(f"Cannot read the tokenizer in {str(d)!r}: {exc}. Re-save it with "
                        "`AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`.") from None
    bos, eos = _special_content(cfg.get("bos_token")), _special_content(cfg.get("eos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    if eos_id is None:
        return None  # let transformers resolve unusual layouts (or report the missing eos)
    # len(tokenizer) as transformers counts it: base vocab plus added tokens beyond it
    size = tok.get_vocab_size(with_added_tokens=True)
    return TokenizerInfo(tok.to_str(), bos_id, eos_id, size, str(d))


def load_tokenizer(spec: str | Path) -> TokenizerInfo:
    """Load an HF fast tokenizer from a local directory or a Hub id; UserError if it cannot be loaded."""
    spec_s = str(spec)
    p = Path(spec_s)
    looks_local = p.exists() or spec_s.startswith((".", "/", "~")) or spec_s.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"Tokenizer path {spec_s!r} is not a directory. Pass a Hugging Face tokenizer directory "
                        "(with tokenizer.json), e.g. one from `ellama data train-tokenizer --out DIR`, or a Hub id "
                        "such as meta-llama/Llama-3.1-8B.")
    if p.is_dir():
        info = _load_local_fast(p)
        if info is not None:
            return info
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec_s)
    except (OSError, ValueError) as exc:
        where = "directory" if looks_local else "Hub id (needs network access and, for gated models, `huggingface-cli login`)"
        raise UserError(f"Cannot load a tokenizer from {spec_s!r} as a {where}: {exc}. Pass a directory holding "
                        "tokenizer.json/tokenizer_config.json, or a reachable Hub id.") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"The tokenizer at {spec_s!r} is not a fast (Rust) tokenizer; tokenize needs tokenizer.json. "
                        "Convert it with transformers (`AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR)`).")
    if tok.eos_token_id is None:
        raise UserError(f"The tokenizer at {spec_s!r} has no eos token, needed as the end-of-document token. Set "
                        "eos_token in its tokenizer_config.json.")
    return TokenizerInfo(tok.backend_tokenizer.to_str(), tok.bos_token_id, tok.eos_token_id, len(tok), spec_s)


_ENC = None  # per-process encoder state: (tokenizers.Tokenizer, bos, eod, dtype, key)


def _init_worker(info: TokenizerInfo, key: str, dtype_str: str) -> None:
    global _ENC
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from tokenizers import Tokenizer

    _ENC = (Tokenizer.from_str(info.json_str), info.bos_id, info.eod_id, np.dtype(dtype_str), key)


def _encode_chunk(chunk: tuple[str, int, list[bytes]]) -> tuple[np.ndarray, np.ndarray, list[Reject], Counter]:
    """Parse and encode one chunk of raw JSONL lines; returns flat ids, per-document lengths, rejects, langs."""
    src_name, first_line, lines = chunk
    tok, bos, eod, dtype, key = _ENC
    texts: list[str] = []
    rejects: list[Reject] = []
    langs: Counter = Counter()
    for k, raw in enumerate(lines):
        src = f"{src_name}:{first_line + k}"
        if not raw.strip():
            rejects.append(Reject(BLANK_LINE, src, "blank line"))
            continue
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            rejects.append(Reject(INVALID_UTF8, src, "invalid UTF-8"))
            continue
        except json.JSONDecodeError as exc:
            rejects.append(Reject(MALFORMED_JSON, src, exc.msg))
            continue
        if not isinstance(obj, dict) or key not in obj:
            rejects.append(Reject(MISSING_FIELD, src, f"no {key!r} field"))
            continue
        text = obj[key]
        if not isinstance(text, str):
            rejects.append(Reject(WRONG_TYPE, src, f"{key!r} is {type(text).__name__}, expected str"))
            continue
        if not text.strip():
            rejects.append(Reject(EMPTY_TEXT, src, f"{key!r} is empty"))
            continue
        texts.append(text)
        lang = obj.get("lang")
        langs[lang if isinstance(lang, str) else "und"] += 1
    encs = tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(tok, "encode_batch_fast") else \
        tok.encode_batch(texts, add_special_tokens=False)
    extra = (1 if bos is not None else 0) + 1
    lengths = np.fromiter((len(e.ids) + extra for e in encs), dtype=np.int32, count=len(encs))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for e in encs:
        if bos is not None:
            flat[pos] = bos
            pos += 1
        n = len(e.ids)
        flat[pos:pos + n] = e.ids
        pos += n
        flat[pos] = eod
        pos += 1
    return flat, lengths, rejects, langs


def _chunks(paths: list[Path], chunk_docs: int, advance: Callable[[int], None] | None) -> Iterator[tuple[str, int, list[bytes]]]:
    for path in paths:
        with open(path, "rb") as f:
            buf: list[bytes] = []
            first = 1
            lineno = 0
            nbytes = 0
            for raw in f:
                lineno += 1
                buf.append(raw)
                nbytes += len(raw)
                if len(buf) >= chunk_docs:
                    yield str(path), first, buf
                    if advance:
                        advance(nbytes)
                    buf, first, nbytes = [], lineno + 1, 0
            if buf:
                yield str(path), first, buf
                if advance:
                    advance(nbytes)


@dataclass
class TokenizeResult:
    prefix: str
    documents: int = 0
    tokens: int = 0
    lines_in: int = 0
    rejected: Counter = field(default_factory=Counter)
    langs: Counter = field(default_factory=Counter)

    def check(self) -> None:
        if self.lines_in != self.documents + sum(self.rejected.values()):
            raise AssertionError(f"tokenize {self.prefix}: lines in {self.lines_in} != documents {self.documents} + "
                                 f"rejected {sum(self.rejected.values())} (bug)")


def tokenize_files(paths: list[Path], tokenizer: TokenizerInfo, prefix: str | Path, *, workers: int = 1,
                   text_key: str = "text", chunk_docs: int = 512, add_bos: bool = True, on_reject: Callable[[Reject], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> TokenizeResult:
    """Tokenize JSONL ``paths`` (field ``text_key``) into ``prefix.bin``/``prefix.idx``; returns counts.

    ``progress(nbytes)`` is called as input bytes are consumed (for a rich progress bar). ``add_bos=False`` writes
    ``tokens + [eod]`` only, byte-identical to Megatron-LM core_v0.15's ``tools/preprocess_data.py --append-eod``
    with its default (non-legacy) HuggingFaceTokenizer.
    """
    if not add_bos:
        tokenizer = TokenizerInfo(tokenizer.json_str, None, tokenizer.eod_id, tokenizer.vocab_size, tokenizer.name)
    from ellama_recipes.data.indexed import TokenWriter

    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}.")
    writer = TokenWriter(prefix, tokenizer.vocab_size)
    dtype_str = np.dtype(writer.dtype).str
    res = TokenizeResult(str(prefix))

    def consume(out) -> None:
        flat, lengths, rejects, langs = out
        writer.add_batch(flat, lengths)
        res.documents += int(lengths.size)
        res.tokens += int(flat.size)
        res.lines_in += int(lengths.size) + len(rejects)
        res.langs.update(langs)
        for rj in rejects:
            res.rejected[rj.reason] += 1
            if on_reject:
                on_reject(rj)

    try:
        chunks = _chunks(paths, chunk_docs, progress)
        if workers == 1:
            global _ENC
            saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
            saved_enc = _ENC
            try:
                _init_worker(tokenizer, text_key, dtype_str)
                for ch in chunks:
                    consume(_encode_chunk(ch))
            finally:
                _ENC = saved_enc
                if saved_env is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved_env
        else:
            ctx = mp.get_context("spawn")  # fresh interpreters: no forked Rust thread pools, no inherited state
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, text_key, dtype_str)) as pool:
                pending: deque = deque()
                for ch in chunks:
                    pending.append(pool.apply_async(_encode_chunk, (ch,)))
                    if len(pending) >= 2 * workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    res.check()
    return res
