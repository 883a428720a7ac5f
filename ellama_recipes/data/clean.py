"""Stage 1, clean: unicode normalisation, HTML/boilerplate strip, length and quality filters, exact dedup,
MinHash-LSH near-duplicate removal, language identification.

CLI: ``ellama data clean --kind domain --input raw/domain --out work/clean``

Every input line ends up either in the output or in the rejects file with a reason and ``file:line``;
:func:`clean` checks ``records in == records out + rejected`` itself.

Memory: dedup state is one 8-byte hash per kept record plus the near-duplicate index (16 band keys and the 8-byte
shingle hashes of every kept record, see :class:`NearDup`). Documents are streamed. Past one machine, dedup runs on
Ray Data: :func:`ellama_recipes.data.dedup.find_duplicates`.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# exact key, shingles, NearDup and the two reasons live in data/dedup.py (re-exported here)
from ellama_recipes.data.dedup import (_WORD, EXACT_DUPLICATE, NEAR_DUPLICATE, NearDup, _dedup_key,  # noqa: F401
                                       _shingles)
from ellama_recipes.data.records import TEXT_FIELD, RecordError, Reject, render, validate

# Filter / dedup reasons.
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
LOW_QUALITY = "low_quality"
DUPLICATE_ID = "duplicate_id"

_TAG_BREAK = re.compile(r"(?is)<\s*(br|/p|/div|/li|/h[1-6]|/tr)\b[^>]*>")
_TAG_LI = re.compile(r"(?is)<\s*li\b[^>]*>")
_SCRIPT = re.compile(r"(?is)<\s*(script|style)\b.*?<\s*/\s*\1\s*>")
_TAG = re.compile(r"(?s)<[^>]{0,500}>")
_WS = re.compile(r"[ \t\u00a0]+")
_NL = re.compile(r"\s*\n\s*")
# Shop boilerplate: whole sentences/lines that carry no content. Matched case-insensitively.
BOILERPLATE_PATTERNS = [
    r"free shipping on orders over [^.!\n]*[.!]?",
    r"click here to buy now[.!]?",
    r"add to cart(\s*\|\s*add to wishlist)?(\s*\|\s*share)?",
    r"©\s*\d{4}[^.\n]*reserved\.?",
    r"all rights reserved\.?",
    r"subscribe to our newsletter[^.!\n]*[.!]?",
]
_BOILER = re.compile(r"(?i)(" + "|".join(BOILERPLATE_PATTERNS) + r")")
# control and format characters (Unicode Cc/Cf: NUL..US except tab/newline, DEL, C1, zero-width, bidi marks, BOM)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_NON_LETTER = re.compile(r"[\W\d_]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, HTML entities and tags out (block tags become line breaks), shop boilerplate out, whitespace tidy."""
    text = unicodedata.normalize("NFKC", text)
    if "<" in text or "&" in text:
        text = _SCRIPT.sub(" ", text)
        text = _TAG_BREAK.sub("\n", text)
        text = _TAG_LI.sub("\n- ", text)
        text = _TAG.sub(" ", text)
        text = html.unescape(text)
        text = unicodedata.normalize("NFKC", text)
    text = _BOILER.sub(" ", text)
    text = _CONTROL.sub("", text)
    text = _WS.sub(" ", text)
    text = _NL.sub("\n", text)
    return text.strip()


def iter_jsonl_texts(path: Path) -> Iterator[str]:
    """Rendered text of every valid record in ``path`` (domain or general, by the presence of ``type``), with
    HTML stripped; invalid lines are skipped (used for tokenizer training only, not for the accounted pipeline)."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw.decode("utf-8"))
                rec = validate(obj, "domain" if isinstance(obj, dict) and "type" in obj else "general")
            except (UnicodeDecodeError, json.JSONDecodeError, RecordError):
                continue
            fld = TEXT_FIELD[rec["type"]]
            rec[fld] = normalize_text(rec[fld])
            yield render(rec)


def quality_problem(text: str, min_chars: int, max_chars: int) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when ``text`` fails the length/quality filters, else None."""
    n = len(text)
    if n < min_chars:
        return TOO_SHORT, f"{n} characters < {min_chars}"
    if n > max_chars:
        return TOO_LONG, f"{n} characters > {max_chars}"
    letters = len(_NON_LETTER.sub("", text))
    if letters / n < 0.5:
        return LOW_QUALITY, f"only {letters / n:.0%} letters"
    words = _WORD.findall(text)
    if len(words) >= 10:
        top = Counter(w.lower() for w in words).most_common(1)[0][1]
        if top / len(words) > 0.3:
            return LOW_QUALITY, "one word is over 30% of the text"
    return None


_LANGID = None


def detect_lang(text: str) -> str:
    """ISO 639-1 language code from py3langid (model ships in the wheel; no download)."""
    global _LANGID
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=False)
    return _LANGID.classify(text[:2000])[0]


@dataclass
class CleanConfig:
    min_chars: int = 40
    max_chars: int = 100_000
    near_dup_threshold: float = 0.8
    num_perm: int = 64
    near_dedup: bool = True
    detect_missing_lang: bool = True


@dataclass
class StageStats:
    """Accounting of one stage: records in / out and rejects by reason."""

    stage: str
    records_in: int = 0
    records_out: int = 0
    rejected: Counter = field(default_factory=Counter)

    def check(self) -> None:
        n_rej = sum(self.rejected.values())
        if self.records_in != self.records_out + n_rej:
            raise AssertionError(f"{self.stage}: records in {self.records_in} != out {self.records_out} + "
                                 f"rejected {n_rej}: a record was lost (bug)")

    def as_dict(self) -> dict:
        return {"stage": self.stage, "records_in": self.records_in, "records_out": self.records_out,
                "rejected": dict(sorted(self.rejected.items()))}


def clean(items: Iterable[tuple[dict | None, Reject | None]], cfg: CleanConfig, stats: StageStats,
          rejects: list[Reject] | None = None, on_reject=None) -> Iterator[dict]:
    """Clean a stream of ``(record, reject)`` pairs from :func:`ellama_recipes.data.records.iter_file`.

    Yields cleaned records (text fields normalised, ``lang`` filled); every reject (parse rejects passed through
    and the ones made here) goes to ``on_reject(reject)`` and is counted in ``stats``.
    """
    exact: set[bytes] = set()
    near = NearDup(cfg.near_dup_threshold, cfg.num_perm) if cfg.near_dedup else None
    product_ids: set[str] = set()

    def reject(rj: Reject) -> None:
        stats.rejected[rj.reason] += 1
        if rejects is not None:
            rejects.append(rj)
        if on_reject is not None:
            on_reject(rj)

    for rec, rj in items:
        stats.records_in += 1
        if rj is not None:
            reject(rj)
            continue
        src = rec["_src"]
        t = rec["type"]
        fld = TEXT_FIELD[t]
        rec[fld] = normalize_text(rec[fld])
        if t == "product":
            rec["title"] = normalize_text(rec["title"])
            if rec["id"] in product_ids:
                reject(Reject(DUPLICATE_ID, src, f"product id {rec['id']!r} seen before"))
                continue
        text = render(rec) if t == "product" else rec[fld]
        if not rec[fld].strip() and t != "product":
            reject(Reject("empty_text", src, "no text left after removing markup/boilerplate"))
            continue
        prob = quality_problem(text, cfg.min_chars, cfg.max_chars)
        if prob is not None:
            reject(Reject(prob[0], src, prob[1]))
            continue
        key = _dedup_key(text)
        if key in exact:
            reject(Reject(EXACT_DUPLICATE, src, "same text as an earlier record"))
            continue
        exact.add(key)
        if near is not None and near.seen(text, key=src):
            rep, jac = near.last_match
            reject(Reject(NEAR_DUPLICATE, src, f"word 5-shingle Jaccard {jac:.2f} >= {cfg.near_dup_threshold} with "
                          f"the earlier record {rep}"))
            continue
        if t == "product":
            product_ids.add(rec["id"])
        if not rec.get("lang"):
            rec["lang"] = detect_lang(text) if cfg.detect_missing_lang else "und"
        stats.records_out += 1
        yield rec
    stats.check()
