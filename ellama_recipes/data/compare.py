"""Comparing two ``ellama data build`` outputs (the Ray build against the in-process one): what issue 19's
equivalence check and ``benchmarks/bench_ray_build.py`` report.

:func:`compare_builds` returns the differences: kept documents per clean stage, rejects (reason + ``file:line``),
tokens per source (the token stream of a source's shards, concatenated, against the single ``.bin``), documents
and blend weight per source, realized ratios. Near-duplicate decisions may differ: each such difference is returned
with the exact word 5-shingle Jaccard of the document and the kept document closest to it, so the caller can check
that it is at or above the threshold.
"""

from __future__ import annotations

import json
from pathlib import Path


def _rejects(out: Path, stage: str) -> dict[str, str]:
    p = Path(out) / "rejects" / f"{stage}.jsonl"
    with open(p, encoding="utf-8") as f:
        return {r["source"]: r["reason"] for r in map(json.loads, f)}


def _kept(out: Path, kind: str) -> list[str]:
    with open(Path(out) / "work" / f"clean_{kind}.jsonl", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def source_groups(manifest: dict) -> dict[str, dict]:
    """name -> {"prefixes": [...], "documents", "tokens", "weight", "side", "lang"} (a shard's name is its
    ``source`` key, an unsharded source's name its prefix's last part)."""
    weights = dict(zip(manifest["blend"][1::2], manifest["blend"][0::2]))
    out: dict[str, dict] = {}
    for s in manifest["sources"]:
        name = s.get("source") or Path(s["prefix"]).name
        g = out.setdefault(name, {"prefixes": [], "documents": 0, "tokens": 0, "weight": 0.0, "side": s["side"],
                                  "lang": s["lang"]})
        g["prefixes"].append(s["prefix"])
        g["documents"] += s["documents"]
        g["tokens"] += s["tokens"]
        g["weight"] += weights.get(s["prefix"], 0.0)
    return out


def _tokens(out: Path, prefixes: list[str]):
    """The concatenated token stream of ``prefixes`` (each ``.bin`` is its documents' tokens back to back, in the
    dtype its ``.idx`` names)."""
    import numpy as np

    from ellama_recipes.data.indexed import read_back

    arrs = [np.fromfile(str(Path(out) / p) + ".bin", dtype=read_back(Path(out) / p)["dtype"]) for p in prefixes]
    return np.concatenate(arrs) if arrs else np.zeros(0)


def compare_builds(ray_out: Path, ref_out: Path) -> dict:
    """Differences between two build folders (empty lists / True flags when equal)."""
    import numpy as np

    ray_out, ref_out = Path(ray_out), Path(ref_out)
    res: dict = {"rejects": {}, "kept_equal": {}, "sources": {}, "tokens_equal": {}}
    for stage in ("clean_domain", "clean_general", "tokenize"):
        a, b = _rejects(ray_out, stage), _rejects(ref_out, stage)
        res["rejects"][stage] = sorted((w, a.get(w), b.get(w)) for w in set(a) | set(b) if a.get(w) != b.get(w))
    for kind in ("domain", "general"):
        res["kept_equal"][kind] = _kept(ray_out, kind) == _kept(ref_out, kind)
    ma = json.loads((ray_out / "manifest.json").read_text())
    mb = json.loads((ref_out / "manifest.json").read_text())
    ga, gb = source_groups(ma), source_groups(mb)
    for name in sorted(set(ga) | set(gb)):
        x, y = ga.get(name), gb.get(name)
        if x is None or y is None:
            res["sources"][name] = {"ray": x, "ref": y}
            continue
        diff = {k: (x[k], y[k]) for k in ("documents", "tokens", "side", "lang") if x[k] != y[k]}
        if abs(x["weight"] - y["weight"]) > 1e-9:
            diff["weight"] = (x["weight"], y["weight"])
        if diff:
            res["sources"][name] = diff
        res["tokens_equal"][name] = bool(np.array_equal(_tokens(ray_out, x["prefixes"]), _tokens(ref_out, y["prefixes"])))
    res["realized"] = (ma["realized"], mb["realized"])
    res["rejected"] = (ma["rejected"], mb["rejected"])
    return res


def text_at(where: str, kind: str) -> str | None:
    """The cleaned text the dedup compares for the input line ``where`` ("file:line"): normalised, products
    rendered; None for a line that does not validate."""
    from ellama_recipes.data.clean import normalize_text
    from ellama_recipes.data.records import TEXT_FIELD, RecordError, render, validate

    path, _, line = where.rpartition(":")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == int(line):
                break
    try:
        rec = validate(json.loads(raw.decode("utf-8")), kind)
    except (ValueError, RecordError):
        return None
    fld = TEXT_FIELD[rec["type"]]
    rec[fld] = normalize_text(rec[fld])
    if rec["type"] == "product":
        rec["title"] = normalize_text(rec["title"])
        return render(rec)
    return rec[fld]
