"""The quickstart's held-out splits (its first stage, written under ``OUT/splits``): which bundled documents the
tiny base and CPT train on, which held-out documents and instructions every model is measured on, and the
no-replay arm's manifest. Used by :mod:`ellama_recipes.workflows.quickstart`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HELDOUT_SFT_EVERY = 10  # every 10th bundled e-commerce SFT conversation is held out (never trained on)
# The product-category questions of the bundled English SFT template, one per English catalog product (sample_data/
# domain/products.jsonl) whose title no bundled SFT conversation asks about: every 10th (by rank) is held out for the
# aligned model's answer accuracy, the first CLASSIFY_TRAIN of the others are added to the SFT data.
CLASSIFY_TRAIN = 160
CLASSIFY_TEMPLATE = "Classify the product into one of these categories: {cats}.\nProduct: {title}\nAnswer with the category only."


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file the quickstart wrote or bundles (blank lines skipped)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` unless the file already holds exactly them (re-runs keep the files' times: align reuses its
    prepared data when its inputs are unchanged)."""
    from ellama_recipes.io.atomic import write_text

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def prepare_splits(out: Path) -> dict[str, Any]:
    """The held-out splits the quickstart trains and measures on, written under ``OUT/splits``:

    - ``splits/general/*.jsonl``: the general documents the tiny base pretrains on and CPT replays
      (:func:`ellama_recipes.model.tiny.split_general_documents` ``train``);
    - ``splits/eval/general_heldout.jsonl``: the held-out general documents, the only general text evaluated;
    - ``splits/sft/``: the bundled SFT conversations minus every 10th e-commerce one; those held-out instructions
      (``splits/eval/sft_heldout.jsonl``) are what the aligned model is asked after alignment.
    Returns the record of which documents are where (ids ``file:line``)."""
    from ellama_recipes.data.bundled import sample_dir
    from ellama_recipes.model.tiny import split_general_documents, split_rule

    split = split_general_documents()
    sp = out / "splits"
    by_file: dict[str, list[dict]] = {}
    for d in split["train"]:
        by_file.setdefault(d["file"], []).append({"text": d["text"], "lang": d["lang"]})
    for name, rows in by_file.items():
        _write_jsonl(sp / "general" / name, rows)
    _write_jsonl(sp / "eval" / "general_heldout.jsonl",
                 [{"text": d["text"], "lang": d["lang"], "id": d["id"]} for d in split["heldout"]])
    sft_train, sft_held = [], []
    for path in sorted((sample_dir() / "sft").glob("*.jsonl")):
        rows = read_jsonl(path)
        keep = []
        for i, r in enumerate(rows, 1):
            held = path.stem == "ecommerce" and i % HELDOUT_SFT_EVERY == 0
            (sft_held if held else keep).append({**r, "id": f"{path.name}:{i}"} if held else r)
        sft_train.append((path.name, keep))
    for name, rows in sft_train:
        _write_jsonl(sp / "sft" / name, rows)
    _write_jsonl(sp / "eval" / "sft_heldout.jsonl", sft_held)
    asked = "\n".join(path.read_text(encoding="utf-8") for path in sorted((sample_dir() / "sft").glob("*.jsonl")))
    cls_train, cls_held = classify_questions(asked)
    _write_jsonl(sp / "sft" / "ecommerce_classify.jsonl", cls_train)
    _write_jsonl(sp / "eval" / "classify_heldout.jsonl", cls_held)
    return {"rule": split_rule(), "base_training": {"documents": len(split["train"]), "path": str(sp / "general")},
            "general_eval": {"documents": len(split["heldout"]), "path": str(sp / "eval" / "general_heldout.jsonl"),
                             "ids": [d["id"] for d in split["heldout"]]},
            "sft_heldout": {"conversations": len(sft_held), "path": str(sp / "eval" / "sft_heldout.jsonl"),
                            "rule": f"every {HELDOUT_SFT_EVERY}th conversation of sft/ecommerce.jsonl"},
            "classify": {"train": len(cls_train), "heldout": len(cls_held),
                         "path": str(sp / "eval" / "classify_heldout.jsonl"),
                         "rule": f"one question per English product of domain/products.jsonl not asked about by the "
                                 f"bundled SFT data; every {HELDOUT_SFT_EVERY}th held out, the first {CLASSIFY_TRAIN} "
                                 "others trained on (splits/sft/ecommerce_classify.jsonl)"}}


def classify_questions(exclude: str) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` product-category conversations in the bundled English SFT template (the category list
    in a per-product order), one per English catalog product whose title does not occur in ``exclude`` (the
    bundled SFT files' text)."""
    import random

    from ellama_recipes.data.bundled import sample_dir

    path = sample_dir() / "domain" / "products.jsonl"
    prods = read_jsonl(path)
    cats = sorted({p["category"] for p in prods})
    train, held, rank = [], [], 0
    for i, p in enumerate(prods, 1):
        if p.get("lang") != "en" or p["title"] in exclude:
            continue
        rank += 1
        order = random.Random(i).sample(cats, len(cats))
        row = {"messages": [{"role": "user", "content": CLASSIFY_TEMPLATE.format(cats=", ".join(order), title=p["title"])},
                            {"role": "assistant", "content": p["category"]}],
               "task": "classify", "lang": "en", "id": f"products.jsonl:{i}"}
        if rank % HELDOUT_SFT_EVERY == 0:
            held.append(row)
        elif len(train) < CLASSIFY_TRAIN:
            train.append(row)
    return train, held


def write_noreplay_manifest(data: Path) -> Path:
    """``DATA/manifest_noreplay.json``: the blend with every general source's weight 0 (domain only: the same
    steps, LR, batch and so tokens, none of them general). The general sources stay listed so pretraining still
    measures val_loss_general on their validation split."""
    from ellama_recipes.io.atomic import write_json

    m = json.loads((data / "manifest.json").read_text())
    side = {s["prefix"]: s["side"] for s in m["sources"]}
    ws, prefixes = m["blend"][0::2], m["blend"][1::2]
    dom = sum(w for w, p in zip(ws, prefixes) if side[p] == "domain")
    blend = [x for w, p in zip(ws, prefixes) for x in ((w / dom if side[p] == "domain" else 0.0), p)]
    target = data / "manifest_noreplay.json"
    write_json(target, {**m, "blend": blend, "replay": "none (general weights 0; quickstart's no-replay arm)"})
    return target


def write_domain_eval(data: Path, target: Path) -> int:
    """The domain documents of the blend's validation split (CPT never trains on them) as JSONL for `ellama eval`."""
    from ellama_recipes.workflows.perplexity import sources_from_manifest

    rows = [{"text": t, "lang": s.lang, "source": s.name} for s in sources_from_manifest(data / "manifest.json",
                                                                                         max_docs=None)
            if s.side == "domain" for t in s.texts]
    _write_jsonl(target, rows)
    return len(rows)
