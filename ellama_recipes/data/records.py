"""Input records: reading JSONL / Parquet, validating the schema, rendering records to text.

Record kinds (issue 3):

- product ``{"type":"product","id","title","category","attributes":{k:v},"description","lang"}``
- review  ``{"type":"review","product_id","rating","text","lang"}``
- article ``{"type":"article","product_ids":[...],"text","lang"}``
- general ``{"text","lang"?}`` (``lang`` detected later when absent)

Reading never stops on a bad line: every line/row yields either a valid record or a :class:`Reject` with a reason
and the source ``file:line``. Paths that do not exist, or folders without ``.jsonl``/``.parquet`` files, are
:class:`~ellama_recipes.errors.UserError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ellama_recipes.errors import UserError

SUFFIXES = (".jsonl", ".parquet")

# Reject reasons (stable strings: they are the keys of manifest["rejected"]).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
UNKNOWN_TYPE = "unknown_type"
BLANK_LINE = "blank_line"


@dataclass
class Reject:
    reason: str
    source: str  # "file:line"
    detail: str = ""

    def as_dict(self) -> dict:
        return {"reason": self.reason, "source": self.source, "detail": self.detail}


class RecordError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# field -> (python types accepted, required)
_STR = (str,)
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "product": {"id": (_STR, True), "title": (_STR, True), "category": (_STR, True), "attributes": ((dict,), True),
                "description": (_STR, True), "lang": (_STR, False)},
    "review": {"product_id": (_STR, True), "rating": ((int, float), True), "text": (_STR, True), "lang": (_STR, False)},
    "article": {"product_ids": ((list,), True), "text": (_STR, True), "lang": (_STR, False)},
    "general": {"text": (_STR, True), "lang": (_STR, False)},
}
TEXT_FIELD = {"product": "description", "review": "text", "article": "text", "general": "text"}


def expand_paths(paths: Iterable[Path | str], what: str = "input") -> list[Path]:
    """Files given, plus the ``.jsonl``/``.parquet`` files (sorted, recursive) of each folder given."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"The {what} path {str(p)!r} does not exist. Pass an existing .jsonl/.parquet file or a "
                            "folder holding them (e.g. `--domain ellama_recipes/sample_data/domain`).")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in SUFFIXES)
            if not found:
                raise UserError(f"The {what} folder {str(p)!r} holds no .jsonl or .parquet files. Point it at a folder "
                                "with data files, or pass the files themselves.")
            out.extend(found)
        else:
            if p.suffix not in SUFFIXES:
                raise UserError(f"The {what} file {str(p)!r} is neither .jsonl nor .parquet. Convert it to JSON Lines "
                                "(one JSON object per line) or Parquet.")
            out.append(p)
    if not out:
        raise UserError(f"No {what} files were given. Pass at least one file or folder.")
    return out


def validate(obj: object, kind: str) -> dict:
    """Check one decoded object against the schema of ``kind`` ("domain" picks by ``type``; "general").

    Returns the record (with ``type`` set) or raises :class:`RecordError`. Unknown extra keys are kept.
    """
    if not isinstance(obj, dict):
        raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    if kind == "general":
        rtype = "general"
    else:
        rtype = obj.get("type")
        if rtype is None:
            raise RecordError(MISSING_FIELD, "missing field 'type' (product, review or article)")
        if rtype not in ("product", "review", "article"):
            raise RecordError(UNKNOWN_TYPE, f"type {rtype!r} is not product, review or article")
    for name, (types, required) in SCHEMAS[rtype].items():
        if name not in obj or obj[name] is None:
            if required:
                raise RecordError(MISSING_FIELD, f"missing field {name!r} in {rtype}")
            continue
        val = obj[name]
        if isinstance(val, bool) or not isinstance(val, types):
            raise RecordError(WRONG_TYPE, f"field {name!r} of {rtype} is {type(val).__name__}, expected "
                                          + " or ".join(t.__name__ for t in types))
    if rtype == "article":
        ids = obj["product_ids"]
        if not ids or not all(isinstance(i, str) for i in ids):
            raise RecordError(WRONG_TYPE, "field 'product_ids' of article must be a non-empty list of strings")
    if rtype == "product":
        if not all(isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
                   for k, v in obj["attributes"].items()):
            raise RecordError(WRONG_TYPE, "field 'attributes' of product must map strings to strings or numbers")
    if rtype == "review" and not (0 <= obj["rating"] <= 5):
        raise RecordError(WRONG_TYPE, f"field 'rating' of review is {obj['rating']}, expected 0..5")
    text = obj[TEXT_FIELD[rtype]]
    if not text.strip() and not (rtype == "product" and obj["title"].strip()):
        raise RecordError(EMPTY_TEXT, f"field {TEXT_FIELD[rtype]!r} is empty")
    rec = dict(obj)
    rec["type"] = rtype
    return rec


def iter_objects(path: Path) -> Iterator[tuple[Any, str, Reject | None]]:
    """``(object, "file:line", None)`` per decodable JSONL line / Parquet row of ``path`` (rows without their null
    columns), or ``(None, "file:line", reject)`` for a blank, non-UTF-8 or malformed line. The one line reader of the
    data stages and the chat rows (:mod:`ellama_recipes.data.chat`); no schema is checked here."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file; all mean "not readable parquet"
            raise UserError(f"{path} is not a readable Parquet file ({exc}). Re-export it, or convert it to JSONL.") \
                from None
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                row += 1
                yield {k: v for k, v in obj.items() if v is not None}, f"{path}:{row}", None
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            src = f"{path}:{lineno}"
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                yield None, src, Reject(BLANK_LINE, src, "blank line")
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield None, src, Reject(INVALID_UTF8, src, f"invalid UTF-8 at byte {exc.start}")
                continue
            try:
                yield json.loads(text), src, None
            except json.JSONDecodeError as exc:
                yield None, src, Reject(MALFORMED_JSON, src, f"{exc.msg} at column {exc.colno}")


def iter_file(path: Path, kind: str) -> Iterator[tuple[dict | None, Reject | None]]:
    """Yield ``(record, None)`` or ``(None, reject)`` for every line (JSONL) or row (Parquet) of ``path``.

    Valid records get ``_src`` = ``"file:line"``.
    """
    parquet = Path(path).suffix == ".parquet"
    for obj, src, rej in iter_objects(path):
        if rej is not None:
            yield None, rej
            continue
        if parquet and kind == "domain" and isinstance(obj.get("attributes"), list):  # parquet map -> list of pairs
            obj["attributes"] = dict(obj["attributes"])
        yield _validated(obj, kind, src)


def _validated(obj: object, kind: str, src: str) -> tuple[dict | None, Reject | None]:
    """(record tagged with its source line, None), or (None, the reject) when ``obj`` fails the schema."""
    try:
        rec = validate(obj, kind)
    except RecordError as exc:
        return None, Reject(exc.reason, src, exc.detail)
    rec["_src"] = src
    return rec, None


def render(rec: dict) -> str:
    """Text of one record for autoregressive LM (the serialisation of semi-structured product records)."""
    t = rec["type"]
    if t == "product":
        attrs = "; ".join(f"{k}: {v}" for k, v in sorted(rec["attributes"].items()))
        parts = [f"Product: {rec['title']}", f"Category: {rec['category']}"]
        if attrs:
            parts.append(f"Attributes: {attrs}")
        if rec["description"].strip():
            parts.append(f"Description: {rec['description']}")
        return "\n".join(parts)
    if t == "review":
        r = rec["rating"]
        r = int(r) if float(r).is_integer() else r
        return f"Review ({r}/5 stars): {rec['text']}"
    return rec["text"]


def iter_text_rows(path: Path) -> Iterator[dict]:
    """``{"text", "lang"}`` rows of any valid line: domain records (by ``type``) are rendered, anything else with a
    ``text`` field (serialized samples, general documents) is taken as is. Invalid lines are skipped."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw.decode("utf-8"))
                kind = "domain" if isinstance(obj, dict) and obj.get("type") in ("product", "review", "article") else "general"
                rec = validate(obj, kind)
            except (UnicodeDecodeError, json.JSONDecodeError, RecordError):
                continue
            yield {"text": render(rec), "lang": rec.get("lang") or "und"}
