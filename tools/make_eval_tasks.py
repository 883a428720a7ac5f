"""Generator of the bundled lm-evaluation-harness task suite (``ellama_recipes/eval_tasks/``).

    python tools/make_eval_tasks.py          # rewrites ellama_recipes/eval_tasks/data/*.jsonl (deterministic)

The items come from a *held-out* draw of the bundled-sample generator (``tools/make_sample.py`` with another seed):
same vocabulary and templates as ``ellama_recipes/sample_data/`` (what the tiny base and the quickstart's
continued pretraining see), but other products, reviews and documents; any item whose product title or document
text occurs verbatim in the bundled sample is dropped. Every task is multiple choice (log-likelihood of each choice,
the harness's ``multiple_choice`` output type), so it is meaningful from a 4-layer CPU model up to 70B.

Domain tasks (EcomGPT-style, prompts in the serialisation the domain data uses: ``Product:``, ``Category:`` ...):

- ``ecom_product_classification``  product title -> one of the 6 categories
- ``ecom_attribute_extraction``    title + description -> the value of one attribute stated there (the distractors:
                                   the product's other attribute values, then other values of that attribute)
- ``ecom_title_generation``        category + attributes + description -> the product's title (4 titles, same category)
- ``ecom_review_sentiment``        a review under its true star rating vs under the mirrored one (5 <-> 1, 4 <-> 2),
                                   balanced positive / negative, in the domain data's ``Review (N/5 stars): text``

General tasks (from general text of the same generator):

- ``general_en_continuation``      three sentences of an English document -> its next sentence (3 distractors: sentences
                                   of other documents)
- ``general_multilingual_continuation``  the same for German, French and Spanish documents
"""

from __future__ import annotations

import html
import json
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "ellama_recipes" / "eval_tasks" / "data"
SAMPLE = ROOT / "ellama_recipes" / "sample_data"
HELD_OUT_SEED = 20261126  # the bundled sample uses 1234

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample import generate  # noqa: E402


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _plain(desc: str, limit: int = 360) -> str:
    text = html.unescape(re.sub(r"<li><b>([^<]+)</b>: ([^<]+)</li>", r" \1: \2.", desc))
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _mc(query: str, choices: list[str], gold: int, **extra) -> dict:
    return {"query": query, "choices": choices, "gold": gold, **extra}


def _shuffled(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


def build(out: Path = OUT, seed: int = HELD_OUT_SEED) -> dict[str, int]:
    rng = random.Random(seed)
    seen_titles = {p["title"] for p in _read(SAMPLE / "domain" / "products.jsonl")}
    seen_reviews = {r["text"] for r in _read(SAMPLE / "domain" / "reviews.jsonl")}
    seen_general = {d["text"] for f in sorted((SAMPLE / "general").glob("*.jsonl")) for d in _read(f)}
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), seed=seed, scale=0.5)
        products = [p for p in _read(Path(tmp) / "domain" / "products.jsonl") if p["title"] not in seen_titles]
        reviews = [r for r in _read(Path(tmp) / "domain" / "reviews.jsonl") if r["text"] not in seen_reviews]
        general = {lang: [d for d in _read(Path(tmp) / "general" / f"general_{lang}.jsonl") if d["text"] not in seen_general]
                   for lang in ("en", "de", "fr", "es")}
    categories = sorted({p["category"] for p in products})
    tasks: dict[str, list[dict]] = {}

    # product classification: 40 per category
    items = []
    for cat in categories:
        for p in [p for p in products if p["category"] == cat][:40]:
            items.append(_mc(f"Product: {p['title']}\nCategory:", categories, categories.index(p["category"])))
    tasks["ecom_product_classification"] = items

    # attribute extraction: the value must be stated in the title or description (extraction, not recall); the
    # distractors are the product's other attribute values (also in its text), then values of the same key
    values: dict[tuple[str, str], set[str]] = {}
    for p in products:
        for k, v in p["attributes"].items():
            values.setdefault((p["category"], k), set()).add(v)
    items = []
    for p in products:
        desc = _plain(p["description"])
        keys = [k for k, v in sorted(p["attributes"].items()) if k != "model" and v in desc]
        if not keys:
            continue
        k = rng.choice(keys)
        v = p["attributes"][k]
        others = [x for kk, x in sorted(p["attributes"].items()) if kk not in (k, "model") and x != v]
        same_key = sorted(values[(p["category"], k)] - {v} - set(others))
        wrong = (rng.sample(others, min(3, len(others))) + rng.sample(same_key, len(same_key)))[:3]
        if len(wrong) < 3:
            continue
        choices, gold = _shuffled(rng, v, wrong)
        items.append(_mc(f"Product: {p['title']}\nDescription: {desc}\nAttributes: {k}:", choices, gold))
        if len(items) == 200:
            break
    tasks["ecom_attribute_extraction"] = items

    # title generation: the product's title among 4 titles of the same category
    items = []
    for p in products[:200]:
        same = [q["title"] for q in products if q["category"] == p["category"] and q["title"] != p["title"]]
        attrs = "; ".join(f"{k}: {v}" for k, v in sorted(p["attributes"].items()))
        choices, gold = _shuffled(rng, p["title"], rng.sample(same, 3))
        items.append(_mc(f"Category: {p['category']}\nAttributes: {attrs}\nDescription: {_plain(p['description'])}\n"
                         "Product:", choices, gold))
    tasks["ecom_title_generation"] = items

    # review sentiment: balanced positive (4-5 stars) / negative (1-2 stars). Scored the way the domain data reads
    # ("Review (N/5 stars): text"): the review under its true rating vs under the mirrored rating (6 - N).
    pos = [r for r in reviews if r["rating"] >= 4][:100]
    neg = [r for r in reviews if r["rating"] <= 2][:100]
    items = []
    for r in pos + neg:
        right, wrong = (f"{n}/5 stars): {r['text']}" for n in (r["rating"], 6 - r["rating"]))
        choices, gold = _shuffled(rng, right, [wrong])
        items.append(_mc("Review (", choices, gold, sentiment="positive" if r["rating"] >= 4 else "negative"))
    rng.shuffle(items)
    tasks["ecom_review_sentiment"] = items

    # general continuation: the next sentence vs three sentences from other documents
    def continuation(docs: list[dict], n: int) -> list[dict]:
        out = []
        pool = [s for d in docs for s in _sentences(d["text"])]
        for d in docs:
            sents = _sentences(d["text"])
            if len(sents) < 4:
                continue
            right = sents[3]
            wrong = []
            while len(wrong) < 3:
                s = rng.choice(pool)
                if s not in sents and s not in wrong:
                    wrong.append(s)
            choices, gold = _shuffled(rng, right, wrong)
            out.append(_mc(" ".join(sents[:3]), choices, gold, lang=d.get("lang", "")))
            if len(out) == n:
                break
        return out

    tasks["general_en_continuation"] = continuation(general["en"], 200)
    tasks["general_multilingual_continuation"] = [
        item for lang in ("de", "fr", "es") for item in continuation(general[lang], 60)]

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in tasks.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    for name, n in build().items():
        print(f"{name}: {n} items")
