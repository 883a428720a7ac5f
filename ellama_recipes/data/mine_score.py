"""Corpus reading and pass 1 (score) of the mining in :mod:`ellama_recipes.data.mine` (split out of data/mine.py).

Reading: the general corpus line by line (:func:`count_lines`, :func:`parse_line`, :func:`sample_general`, the
classifier's general sample). Pass 1: chunks of lines go to ``workers`` processes (each loads the saved fold models
once, :func:`_init_worker`) and :func:`_score_chunk` returns float32 log-odds, languages and token counts;
:func:`score_corpus` appends them to the per-document files of the work folder and sums the score histogram
(:class:`Scored`). Every public name stays importable from ``ellama_recipes.data.mine``.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ellama_recipes.data.classify import FoldModels
from ellama_recipes.data.records import BLANK_LINE, INVALID_UTF8, MALFORMED_JSON, RecordError, render, validate
from ellama_recipes.errors import UserError

CHUNK_DOCS = 1024
HIST_BINS = 1 << 16

# ------------------------------------------------------------------------------------------------ corpus reading


def _lines(paths: list[Path]) -> Iterator[bytes]:
    for p in paths:
        with open(p, "rb") as f:
            yield from f


def _sourced_lines(paths: list[Path]) -> Iterator[tuple[str, bytes]]:
    """``("file:line", raw)`` for every line of ``paths``."""
    for p in paths:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield f"{p}:{n}", raw


def count_lines(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        last = b"\n"
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            n += 1
    return n


def parse_line(raw: bytes) -> tuple[str, str] | tuple[None, tuple[str, str]]:
    """``(text, lang)`` of a general line (domain records are rendered), or ``(None, (reason, detail))``."""
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        return None, (BLANK_LINE, "blank line")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, (INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}")
    except json.JSONDecodeError as exc:
        return None, (MALFORMED_JSON, f"{exc.msg} at column {exc.colno}")
    kind = "domain" if isinstance(obj, dict) and obj.get("type") in ("product", "review", "article") else "general"
    try:
        rec = validate(obj, kind)
    except RecordError as exc:
        return None, (exc.reason, exc.detail)
    return render(rec), (rec.get("lang") or "und")


def sample_general(paths: list[Path], max_docs: int, total_lines: int | None = None) -> list[tuple[int, str]]:
    """Every ``stride``-th valid line as ``(corpus_index, text)``, at most about ``max_docs`` of them."""
    n = count_lines(paths) if total_lines is None else total_lines
    stride = max(1, math.ceil(n / max(1, max_docs)))
    out = []
    for i, raw in enumerate(_lines(paths)):
        if i % stride == 0:
            text, _ = parse_line(raw)
            if text is not None:
                out.append((i, text))
    return out


# ------------------------------------------------------------------------------------------------ pass 1: score

_W = None  # per-process state: (FoldModels, tokenizers.Tokenizer | None, extra tokens per document)


def _init_worker(model_path: str, tok_json: str | None, extra: int) -> None:
    global _W
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tok = None
    if tok_json is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tok_json)
    _W = (FoldModels.load(Path(model_path)), tok, extra)


def _score_chunk(chunk: tuple[int, list[bytes]]):
    first, lines = chunk
    models, tok, extra = _W
    texts, where, langs = [], [], []
    rejects = []
    for k, raw in enumerate(lines):
        text, info = parse_line(raw)
        if text is None:
            rejects.append((first + k, *info))
            langs.append(None)
            continue
        texts.append(text)
        where.append(k)
        langs.append(info)
    scores = np.full(len(lines), np.nan, np.float32)
    idx = np.array(where, dtype=np.int64)
    if texts:
        # each document is scored by the model of its fold (fold_of(corpus index), as in training)
        scores[idx] = models.score_at(texts, first + idx)
    ntok = None
    if tok is not None:
        ntok = np.zeros(len(lines), np.uint32)
        if texts:
            enc = tok.encode_batch_fast(texts, add_special_tokens=False) if hasattr(tok, "encode_batch_fast") else \
                tok.encode_batch(texts, add_special_tokens=False)
            ntok[idx] = [len(e.ids) + extra for e in enc]
    return first, scores, langs, ntok, rejects


def _chunks(paths: list[Path], chunk_docs: int, advance) -> Iterator[tuple[int, list[bytes]]]:
    buf: list[bytes] = []
    first = 0
    for i, raw in enumerate(_lines(paths)):
        buf.append(raw)
        if len(buf) >= chunk_docs:
            yield first, buf
            if advance:
                advance(len(buf))
            first, buf = i + 1, []
    if buf:
        yield first, buf
        if advance:
            advance(len(buf))


def _keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving map float32 -> uint32 (for radix selection)."""
    bits = scores.view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _unkey(keys) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys >> 31, keys & np.uint32(0x7FFFFFFF), ~keys).astype(np.uint32)
    return bits.view(np.float32)


@dataclass
class Scored:
    """What pass 1 leaves behind (files in ``work``) and its summaries."""

    work: Path
    lines: int = 0
    valid: int = 0
    rejected: Counter = field(default_factory=Counter)
    # invalid lines go to work/rejects.tmp.jsonl as [corpus_index, reason, detail] (route() names their file:line)
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))
    hist_tokens: np.ndarray | None = None
    langs: list[str] = field(default_factory=list)  # id -> language code
    has_tokens: bool = False
    seconds: float = 0.0


def score_corpus(paths: list[Path], models_path: Path, work: Path, *, workers: int = 1, tokenizer=None,
                 add_bos: bool = True, chunk_docs: int = CHUNK_DOCS,
                 progress: Callable[[int], None] | None = None, scorer: Callable | None = None) -> Scored:
    """Pass 1: score every line of ``paths`` with the saved fold models; see the module docstring.

    ``scorer(paths, model_path, tok_json, extra, progress)``, when given, yields the :func:`_score_chunk` results
    of the whole corpus in corpus order, computed elsewhere (the Ray build's actor pool,
    :func:`ellama_recipes.data.ray_build.ray_scorer`); ``workers`` is then unused."""
    import time

    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}.")
    work.mkdir(parents=True, exist_ok=True)
    sc = Scored(work, has_tokens=tokenizer is not None)
    if sc.has_tokens:
        sc.hist_tokens = np.zeros(HIST_BINS, np.int64)
    lang_id: dict[str, int] = {}
    f_s = open(work / "scores.f32", "wb")
    f_l = open(work / "langs.u16", "wb")
    f_t = open(work / "tokens.u32", "wb") if sc.has_tokens else None
    f_r = open(work / "rejects.tmp.jsonl", "w", encoding="utf-8")
    tok_json = tokenizer.json_str if tokenizer is not None else None
    extra = ((1 if (tokenizer is not None and tokenizer.bos_id is not None and add_bos) else 0) + 1)
    t0 = time.perf_counter()

    def consume(out) -> None:
        first, scores, langs, ntok, rejects = out
        assert first == sc.lines, "chunks out of order (bug)"
        sc.lines += len(scores)
        ids = np.empty(len(langs), np.uint16)
        for k, lg in enumerate(langs):
            if lg is None:
                ids[k] = 0xFFFF
                continue
            if lg not in lang_id:
                if len(lang_id) >= 0xFFFF:
                    raise UserError("More than 65,535 distinct language codes in the general corpus; check its lang field.")
                lang_id[lg] = len(lang_id)
                sc.langs.append(lg)
            ids[k] = lang_id[lg]
        for r in rejects:
            sc.rejected[r[1]] += 1
            f_r.write(json.dumps(r, ensure_ascii=False) + "\n")
        ok = ~np.isnan(scores)
        sc.valid += int(ok.sum())
        b = (_keys(scores[ok]) >> 16).astype(np.int64)
        sc.hist += np.bincount(b, minlength=HIST_BINS)
        f_s.write(scores.tobytes())
        f_l.write(ids.tobytes())
        if f_t is not None:
            f_t.write(ntok.tobytes())
            sc.hist_tokens += np.bincount(b, weights=ntok[ok].astype(np.float64), minlength=HIST_BINS).astype(np.int64)

    try:
        if scorer is not None:
            for out in scorer(paths, str(models_path), tok_json, extra, progress):
                consume(out)
        elif workers == 1:
            global _W
            saved = _W
            try:
                _init_worker(str(models_path), tok_json, extra)
                for ch in _chunks(paths, chunk_docs, progress):
                    consume(_score_chunk(ch))
            finally:
                _W = saved
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(str(models_path), tok_json, extra)) as pool:
                pending: deque = deque()
                for ch in _chunks(paths, chunk_docs, progress):
                    pending.append(pool.apply_async(_score_chunk, (ch,)))
                    if len(pending) >= 2 * workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
    finally:
        f_s.close()
        f_l.close()
        f_r.close()
        if f_t is not None:
            f_t.close()
    sc.seconds = time.perf_counter() - t0
    return sc
