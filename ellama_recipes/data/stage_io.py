"""Small shared pieces of the build's two executors (in-process :mod:`ellama_recipes.data.pipeline` and Ray
:mod:`ellama_recipes.data.ray_build`): JSONL writing/reading of work files, the per-language split of the general
side, the manifest's summary of a mining run."""

from __future__ import annotations

import json
from pathlib import Path

CLASSIFY_MAX_TRAIN = 20_000  # general docs (an even sample of the corpus) in the classifier's training set


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
            n += 1
    return n


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _split_by_lang(path: Path, work: Path, advance) -> tuple[dict[str, Path], int]:
    """General documents to ``work/general_<lang>.jsonl`` (no mining)."""
    files: dict[str, object] = {}
    paths: dict[str, Path] = {}
    n = 0
    try:
        for rec in _read_jsonl(path):
            lang = rec.get("lang") or "und"
            if lang not in files:
                paths[lang] = work / f"general_{lang}.jsonl"
                files[lang] = open(paths[lang], "w", encoding="utf-8")
            files[lang].write(json.dumps({"text": rec["text"], "lang": lang}, ensure_ascii=False) + "\n")
            n += 1
            advance()
    finally:
        for f in files.values():
            f.close()
    return paths, n


def _mined_summary(res) -> dict:
    """What the manifest says about the mined source: the budget and the lowest score mined."""
    r = res.report
    return {"budget": r["budget"], "general_documents": r["general_documents"], "mined_documents": r["mined"],
            "min_score": r["min_mined_score"], "min_p_domain": r["min_mined_p_domain"]}


def serialize_stage(dom_recs: list[dict], mcfg, mix: str, work: Path, report: dict) -> tuple[list[dict], dict[str, Path]]:
    """Stage 2 of both executors: the domain records serialized (the EcomGPT-CT graph mix, or one file per source
    kind), accounted (records in = records placed) into ``report``, written under ``work``; returns the samples and name -> file."""
    from ellama_recipes.data.clean import StageStats
    from ellama_recipes.data.serialize import mix_stats, serialize

    samples = serialize(dom_recs, mcfg)
    placed = sum(len(s["records"]) for s in samples)
    sstats = StageStats("serialize", records_in=len(dom_recs), records_out=placed)
    sstats.check()
    report["stages"].append(sstats.as_dict())
    report["mix"] = {"strategy": mix, **mix_stats(samples)}
    domain_files: dict[str, Path] = {}
    if mix == "graph":
        domain_files["domain_graph"] = work / "domain_graph.jsonl"
        _write_jsonl(domain_files["domain_graph"], samples)
    else:
        for src in ("product", "review", "article"):
            rows = [s for s in samples if s["sources"] == [src]]
            if rows:
                domain_files[f"domain_{src}"] = work / f"domain_{src}.jsonl"
                _write_jsonl(domain_files[f"domain_{src}"], rows)
    return samples, domain_files
