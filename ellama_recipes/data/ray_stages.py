"""The workers of the Ray Data build: what runs inside ``map_batches`` (one batch = one block of a file).

Each class is a stateful map run by :func:`run_block` in Ray tasks (``map_batches(run_block, fn_args=(Cls, args))``):
what is expensive to load (the language-id model, the tokenizer, the fitted classifier) is loaded once per worker
process in ``__init__`` and kept across blocks and stages, then every batch is one
:class:`~ellama_recipes.data.blocks.Block` (its row dict) the task reads itself from the shared file system. Every
output row says on which Ray node it ran (``node``), so a multi-node run can show work on both nodes.

Nothing here decides anything the sequential pipeline does not: the rules are the same functions
(:func:`ellama_recipes.data.clean.normalize_text`, :func:`~ellama_recipes.data.clean.quality_problem`,
:func:`~ellama_recipes.data.records.validate`, :func:`~ellama_recipes.data.mine._score_chunk`,
:func:`~ellama_recipes.data.tokenize._encode_chunk`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (the in-process fallback of a test)
        return "local"


def _first(batch: dict) -> dict:
    """The one block of a ``batch_size=1`` batch, as a plain dict of Python values."""
    out = {}
    for k, v in batch.items():
        x = v[0]
        out[k] = x.item() if hasattr(x, "item") else x
    return out


def _cols(rows: list[dict], names: tuple[str, ...]) -> dict:
    return {n: np.array([r[n] for r in rows], dtype=object if not rows or isinstance(rows[0][n], str) else None)
            for n in names}


_WORKERS: dict = {}  # per worker process: class name -> (args key, instance)


def run_block(batch: dict, cls, args: tuple) -> dict:
    """One block through ``cls(*args)``, built once per worker PROCESS and kept for every later block (and stage)
    this process runs with the same arguments: the stages are Ray tasks (``map_batches(run_block, fn_args=(cls,
    args))``) on the job's pooled worker processes, so the language-id model, the tokenizer and the fitted
    classifier are loaded once per process for the whole build, not once per stage's actor pool."""
    import pickle
    from hashlib import blake2b

    key = blake2b(pickle.dumps(args), digest_size=16).digest()
    have = _WORKERS.get(cls.__name__)
    if have is None or have[0] != key:
        _WORKERS[cls.__name__] = have = (key, cls(*args))
    return have[1](batch)


def warm_up() -> None:
    """Import what the later stages load (megatron-core's indexed-dataset writer and torch, the tokenizer, the
    classifier's libraries) in this worker process; the driver fires it while it works alone (dedup, graph mix,
    the classifier's fit), so the worker is warm when scoring and tokenizing start."""
    import joblib  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import tokenizers  # noqa: F401

    from ellama_recipes.data import indexed, mine, tokenize  # noqa: F401

    indexed._idx_mod()


CLEAN_COLUMNS = ("gid", "where", "reason", "detail", "rec", "text", "pid", "node")


class CleanBlock:
    """Parse, validate, normalise, apply the quality rules and identify the language of one block.

    One output row per input line: ``reason`` is "" for a record that passed (it still goes through the dedup) or
    the reject reason; ``rec`` is the cleaned record as the JSON line the sequential stage writes; ``text`` is what
    the dedup compares (the rendered product, else the text field); ``pid`` a product's id ("" otherwise)."""

    def __init__(self, kind: str, cfg: dict):
        from ellama_recipes.data.clean import CleanConfig, detect_lang

        self.kind = kind
        self.cfg = CleanConfig(**cfg)
        if self.cfg.detect_missing_lang:
            detect_lang("warm up")  # load py3langid's model once per actor
        self.node = _node_id()

    def __call__(self, batch: dict) -> dict:
        from ellama_recipes.data.blocks import gid, iter_block_objects
        from ellama_recipes.data.clean import detect_lang, normalize_text, quality_problem
        from ellama_recipes.data.records import TEXT_FIELD, RecordError, render, validate

        block = _first(batch)
        rows = []
        for obj, src, line, rj in iter_block_objects(block):
            row = {"gid": gid(block["file_index"], line), "where": src, "reason": "", "detail": "", "rec": "",
                   "text": "", "pid": "", "node": self.node}
            rows.append(row)
            if rj is not None:
                row["reason"], row["detail"] = rj.reason, rj.detail
                continue
            if block["parquet"] and self.kind == "domain" and isinstance(obj.get("attributes"), list):
                obj["attributes"] = dict(obj["attributes"])
            try:
                rec = validate(obj, self.kind)
            except RecordError as exc:
                row["reason"], row["detail"] = exc.reason, exc.detail
                continue
            t = rec["type"]
            fld = TEXT_FIELD[t]
            rec[fld] = normalize_text(rec[fld])
            if t == "product":
                rec["title"] = normalize_text(rec["title"])
                row["pid"] = rec["id"]
            text = render(rec) if t == "product" else rec[fld]
            if not rec[fld].strip() and t != "product":
                row["reason"], row["detail"] = "empty_text", "no text left after removing markup/boilerplate"
                continue
            prob = quality_problem(text, self.cfg.min_chars, self.cfg.max_chars)
            if prob is not None:
                row["reason"], row["detail"] = prob
                continue
            if not rec.get("lang"):
                rec["lang"] = detect_lang(text) if self.cfg.detect_missing_lang else "und"
            row["rec"] = json.dumps(rec, ensure_ascii=False)
            row["text"] = text
        return _cols(rows, CLEAN_COLUMNS) if rows else {n: np.array([], dtype=object) for n in CLEAN_COLUMNS}


class ScoreBlock:
    """Score one block of the cleaned general corpus with the fitted fold models (loaded once per actor):
    :func:`ellama_recipes.data.mine._score_chunk` on the block's lines; ``first`` is the corpus index of its first
    line in the whole corpus (the fold of each document depends on it)."""

    def __init__(self, model_path: str, tok_json: str | None, extra: int):
        from ellama_recipes.data import mine

        mine._init_worker(model_path, tok_json, extra)
        self.node = _node_id()

    def __call__(self, batch: dict) -> dict:
        from ellama_recipes.data import mine
        from ellama_recipes.data.blocks import read_lines

        block = _first(batch)
        first, scores, langs, ntok, rejects = mine._score_chunk((block["first"], read_lines(block)))
        return {"first": np.array([first], np.int64), "scores": np.array([scores.tobytes()], dtype=object),
                "langs": np.array([json.dumps(langs)], dtype=object),
                "ntok": np.array([b"" if ntok is None else ntok.tobytes()], dtype=object),
                "rejects": np.array([json.dumps(rejects, ensure_ascii=False)], dtype=object),
                "node": np.array([self.node], dtype=object)}


class TokenizeBlock:
    """Tokenize one block into its own Megatron shard ``PREFIX.bin/.idx`` (megatron-core's builder through
    :class:`ellama_recipes.data.indexed.TokenWriter`), written under temporary names and renamed into place, then
    ``PREFIX.shard.json`` (counts, rejects with ``file:line``, languages) renamed last: a shard is finished iff its
    ``.shard.json`` exists, and a half-written one is never visible under its name."""

    def __init__(self, tok: dict, text_key: str = "text"):
        from ellama_recipes.data.indexed import optimal_dtype
        from ellama_recipes.data.tokenize import TokenizerInfo, _init_worker

        self.info = TokenizerInfo(**tok)
        _init_worker(self.info, text_key, np.dtype(optimal_dtype(self.info.vocab_size)).str)
        self.node = _node_id()

    def __call__(self, batch: dict) -> dict:
        from ellama_recipes.data.blocks import read_lines
        from ellama_recipes.data.indexed import TokenWriter
        from ellama_recipes.data.tokenize import _encode_chunk
        from ellama_recipes.io.atomic import replace_all, write_json

        block = _first(batch)
        prefix = Path(block["prefix"])
        flat, lengths, rejects, langs = _encode_chunk((block["path"], block["first_line"], read_lines(block)))
        tmp = prefix.parent / f".{prefix.name}.tmp{os.getpid()}"
        w = TokenWriter(tmp, self.info.vocab_size)
        try:
            w.add_batch(flat, lengths)
            w.finalize()
        except BaseException:
            w.abort()
            for ext in (".bin", ".idx"):
                Path(str(tmp) + ext).unlink(missing_ok=True)
            raise
        replace_all([(str(tmp) + ext, str(prefix) + ext) for ext in (".bin", ".idx")])
        meta = {"name": block["name"], "shard": block["shard"], "documents": int(lengths.size),
                "tokens": int(flat.size), "lines_in": int(lengths.size) + len(rejects),
                "rejects": [rj.as_dict() for rj in rejects], "langs": dict(langs), "node": self.node}
        write_json(str(prefix) + ".shard.json", meta)
        return {"name": np.array([block["name"]], dtype=object), "shard": np.array([block["shard"]], np.int64),
                "node": np.array([self.node], dtype=object)}
