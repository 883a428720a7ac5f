"""``ellama data build`` on Ray Data (issue 19): the same stages, outputs and accounting as the in-process pipeline
(:func:`ellama_recipes.data.pipeline.build` with ``executor="inprocess"``), with the per-record work in Ray.

Stages and the engine operators they use (``ds`` = a :class:`ray.data.Dataset`):

1. **clean** (domain, general): the input files are split into blocks of whole lines
   (:mod:`ellama_recipes.data.blocks`); ``from_items(blocks).map_batches(run_block, fn_args=(CleanBlock, ...))``
   parses, validates, normalises, applies the quality rules and identifies the language (one Ray task per block;
   py3langid's model loaded once per worker process, see :func:`_map_blocks`). Every line comes back as one row
   (kept, or rejected with its reason and ``file:line``). The product-id rule (a product whose id was kept before is
   a ``duplicate_id``) runs on the driver over the domain records, which the graph mix holds in memory anyway.
   Dedup is :func:`ellama_recipes.data.dedup.find_duplicates` (exact by content hash through a shuffle, MinHash LSH
   bands through a shuffle, exact Jaccard check, distributed connected components).
2. **serialize**: the EcomGPT-CT graph mix (ellama code, on the driver, as today).
3. **classify / mine**: the classifier is fitted on an even sample (as today); the corpus is scored by
   ``map_batches(run_block, fn_args=(ScoreBlock, ...))`` (tasks; the fitted models loaded once per process), then
   the exact budget cut-off and the routing are :mod:`ellama_recipes.data.mine`'s (same documents as today for the
   same corpus/budget).
4. **tokenize**: every block of every source becomes its own Megatron shard ``tokenized/NAME/NAME-00000.bin/.idx``
   (``map_batches(run_block, fn_args=(TokenizeBlock, ...))``, megatron-core's builder in the task, temp names
   renamed into place, a ``.shard.json`` with its counts renamed last). The manifest lists every shard as a source
   entry with ``"source": NAME``; the blend (token-exact, per side and language) is
   :func:`ellama_recipes.data.blend.make_manifest`.
5. **blend**: ``manifest.json`` + ``report.json`` (per-stage accounting summed over blocks and shards).

Resume: the build works in ``OUT/../.OUT.partial`` (kept when killed). Each finished stage leaves
``work/stages/STAGE.json`` (its accounting) and finished shards their ``.shard.json``; a re-run with the same inputs
and settings (``work/fingerprint.json``) skips them. When everything is written the folder replaces ``OUT`` whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from ellama_recipes.data.blocks import BLOCK_BYTES, split_file, split_files
from ellama_recipes.data.clean import EXACT_DUPLICATE, CleanConfig, StageStats
from ellama_recipes.data.ray_env import (  # noqa: F401  (ray_session: cli/data.py imports it from here)
    SESSION, _block_size, _map_blocks, _pool, _warm_workers, ray_session)
from ellama_recipes.errors import UserError

SHARD_BYTES = 16 << 20  # input bytes per tokenized shard
DEDUP_LOCAL_MAX = 200_000  # dedup="auto" on a local Ray instance: up to this many records deduped on the driver
DEDUPS = ("auto", "ray", "local")
DUPLICATE_ID = "duplicate_id"
QUALITY = ("too_short", "too_long", "low_quality")


# ------------------------------------------------------------------------------------------------ state folder


class State:
    """The build's resumable work folder: stage markers and the fingerprint of inputs + settings."""

    def __init__(self, out: Path, fingerprint: dict):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {str(out)!r} exists and is a file. Pass a folder path.")
        self.dir = self.out.parent / f".{self.out.name}.partial"
        fp_file = self.dir / "work" / "fingerprint.json"
        same = fp_file.is_file() and json.loads(fp_file.read_text()) == fingerprint
        if self.dir.exists() and not same:
            shutil.rmtree(self.dir)
        self.resumed = same
        self.local_ray = True
        (self.dir / "work" / "stages").mkdir(parents=True, exist_ok=True)
        from ellama_recipes.io.atomic import write_json

        write_json(fp_file, fingerprint)

    def done(self, stage: str) -> dict | None:
        p = self.dir / "work" / "stages" / f"{stage}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def finish(self, stage: str, info: dict) -> dict:
        from ellama_recipes.io.atomic import write_json

        write_json(self.dir / "work" / "stages" / f"{stage}.json", info)
        return info

    def promote(self) -> None:
        from ellama_recipes.io.atomic import replace_dir

        replace_dir(self.dir, self.out)


def fingerprint(files: list[Path], settings: dict) -> dict:
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            "settings": settings}


# ------------------------------------------------------------------------------------------------ 1. clean


def _dedup_cfg(ccfg: CleanConfig):
    from ellama_recipes.data.dedup import DedupConfig

    return DedupConfig(threshold=ccfg.near_dup_threshold, near=ccfg.near_dedup)


def _duplicate_ids(rows: list[dict]) -> None:
    """The product-id rule on the driver, in corpus order: a product whose id was already taken by an earlier
    product that passed the quality rules is a ``duplicate_id`` (checked before the quality rules, as today)."""
    taken: set[str] = set()
    for r in rows:
        pid = r["pid"]
        if not pid or r["reason"] not in ("",) + QUALITY:
            continue
        if pid in taken:
            r["reason"], r["detail"] = DUPLICATE_ID, f"product id {pid!r} seen before"
            continue
        if r["reason"] == "":
            taken.add(pid)


def _find_duplicates(survivors, ccfg: CleanConfig, dedup: str) -> list[dict]:
    """The rows to drop, by :func:`ellama_recipes.data.dedup.find_duplicates` (``dedup="ray"``: shuffles across
    the cluster) or :func:`~ellama_recipes.data.dedup.find_duplicates_local` on the driver (``"local"``: the same
    decisions, no shuffle stages; what ``"auto"`` picks on a local Ray instance for up to DEDUP_LOCAL_MAX
    documents, where Ray's shuffle start-up costs more than the whole dedup)."""
    from ellama_recipes.data.dedup import find_duplicates, find_duplicates_local

    if dedup == "local":  # survivors: an iterable of row dicts
        return find_duplicates_local(survivors, _dedup_cfg(ccfg))
    return list(find_duplicates(survivors, _dedup_cfg(ccfg)).iter_rows())


def _survivor(r: dict) -> dict:
    """A kept clean row as dedup's input row (the Ray path's select/rename gives the same columns)."""
    return {"id": r["gid"], "text": r["text"], "where": r["where"]}


def clean_kind(files: list[Path], kind: str, ccfg: CleanConfig, st: State, n_cpus: int,
               block_bytes: int = BLOCK_BYTES, dedup: str = "ray") -> dict:
    """Stage 1 for one kind; writes work/clean_KIND.jsonl and rejects/clean_KIND.jsonl; returns the stage info
    (stats, nodes seen)."""
    import ray.data

    from ellama_recipes.data.ray_stages import CleanBlock
    from ellama_recipes.io.atomic import atomic_path

    stage = f"clean_{kind}"
    info = st.done(stage)
    if info is not None:
        return info
    t0 = time.perf_counter()
    blocks = [b.as_row() for b in split_files(files, _block_size(block_bytes, files, n_cpus))]
    cleaned = _map_blocks(blocks, CleanBlock, (kind, asdict(ccfg)), n_cpus).materialize()
    stats = StageStats(f"clean {kind}")
    nodes: Counter = Counter()
    if dedup == "auto":
        dedup = "local" if st.local_ray and cleaned.count() <= DEDUP_LOCAL_MAX else "ray"
    if kind == "domain":  # the product-id rule needs corpus order; domain rows are held for the graph anyway
        rows = [dict(r) for r in cleaned.iter_rows()]
        _duplicate_ids(rows)
        kept = (_survivor(r) for r in rows if r["reason"] == "")
        if dedup == "local":  # straight from the rows in hand: no dataset, no Ray execution
            survivors = kept
        else:
            survivors = ray.data.from_items(list(kept), override_num_blocks=max(1, min(len(blocks), n_cpus)))
    else:
        rows = None
        if dedup == "local":  # one pass over the materialized blocks on the driver, no filter/select stage
            survivors = (_survivor(r) for b in cleaned.iter_batches(batch_size=4096, batch_format="numpy")
                         for r in _batch_rows(b) if r["reason"] == "")
        else:
            survivors = cleaned.filter(expr="reason == ''").select_columns(["gid", "text", "where"]) \
                .rename_columns({"gid": "id"})
    drops = {int(d["id"]): d for d in _find_duplicates(survivors, ccfg, dedup)}
    (st.dir / "rejects").mkdir(exist_ok=True)
    (st.dir / "work").mkdir(exist_ok=True)
    with atomic_path(st.dir / "rejects" / f"{stage}.jsonl") as rtmp, atomic_path(st.dir / "work" / f"{stage}.jsonl") as ctmp, \
            atomic_path(st.dir / "work" / f"{stage}.where") as wtmp, open(rtmp, "w", encoding="utf-8") as rf, \
            open(ctmp, "w", encoding="utf-8") as cf, open(wtmp, "w", encoding="utf-8") as wf:
        it = rows if rows is not None else (r for b in cleaned.iter_batches(batch_size=4096, batch_format="numpy")
                                            for r in _batch_rows(b))
        for r in it:
            stats.records_in += 1
            nodes[r["node"]] += 1
            reason, detail = r["reason"], r["detail"]
            d = drops.get(int(r["gid"])) if reason == "" else None
            if d is not None:
                reason = d["reason"]
                detail = "same text as an earlier record" if reason == EXACT_DUPLICATE else \
                    f"word 5-shingle Jaccard {float(d['jaccard']):.3f} >= {ccfg.near_dup_threshold} with {d['rep_where']}"
                if reason == EXACT_DUPLICATE:
                    detail += f" ({d['rep_where']})"
            if reason:
                stats.rejected[reason] += 1
                rf.write(json.dumps({"reason": reason, "source": r["where"], "detail": detail}, ensure_ascii=False)
                         + "\n")
            else:
                stats.records_out += 1
                cf.write(r["rec"] + "\n")
                if kind == "domain":  # file:line of each kept record (the graph mix's "records")
                    wf.write(r["where"] + "\n")
    stats.check()
    if stats.records_out == 0:
        raise UserError(f"No valid {kind} record in {', '.join(map(str, files))}: all {stats.records_in} lines were "
                        f"rejected ({dict(stats.rejected)}). See {st.out}/rejects/{stage}.jsonl (in "
                        f"{st.dir} while the build is unfinished) for each line's reason; fix the input format "
                        "(JSON Lines, schema in `ellama data build --help`).")
    return st.finish(stage, {"stats": stats.as_dict(), "nodes": dict(nodes), "blocks": len(blocks), "dedup": dedup,
                             "seconds": round(time.perf_counter() - t0, 2)})


def _batch_rows(b: dict):
    keys = list(b)
    for i in range(len(b[keys[0]])):
        yield {k: (b[k][i].item() if hasattr(b[k][i], "item") else b[k][i]) for k in keys}


# ------------------------------------------------------------------------------------------------ 3. score


def ray_scorer(n_cpus: int, block_bytes: int = BLOCK_BYTES, nodes: Counter | None = None):
    """A scorer for :func:`ellama_recipes.data.mine.score_corpus`: blocks of the corpus scored by Ray tasks
    holding the fitted fold models (once per worker process); yields ``_score_chunk`` results in corpus order."""
    import numpy as np

    from ellama_recipes.data.ray_stages import ScoreBlock

    def score(paths, model_path: str, tok_json, extra: int, progress=None):
        blocks, first = [], 0
        size = _block_size(block_bytes, paths, n_cpus)
        for i, p in enumerate(paths):
            for b in split_file(p, i, size):
                blocks.append({**b.as_row(), "first": first})
                first += b.lines
        if not blocks:
            return
        ds = _map_blocks(blocks, ScoreBlock, (model_path, tok_json, extra), n_cpus)
        for b in ds.iter_batches(batch_size=1, batch_format="numpy"):
            scores = np.frombuffer(b["scores"][0], np.float32)
            ntok = np.frombuffer(b["ntok"][0], np.uint32) if len(b["ntok"][0]) else None
            if tok_json is None:
                ntok = None
            if nodes is not None:
                nodes[str(b["node"][0])] += 1
            if progress:
                progress(scores.size)
            yield int(b["first"][0]), scores, json.loads(b["langs"][0]), ntok, \
                [tuple(x) for x in json.loads(b["rejects"][0])]

    return score


# ------------------------------------------------------------------------------------------------ 4. tokenize


def tokenize_sources(jobs: list[tuple[str, Path, str]], tok, tok_dir: Path, n_cpus: int,
                     shard_bytes: int = SHARD_BYTES) -> dict[str, list[dict]]:
    """Every block of every job ``(name, path, side)`` to its own shard under ``tok_dir/NAME/``; shards finished by
    an earlier (killed) run are not redone. Returns name -> the shard metas in shard order."""
    from ellama_recipes.data.ray_stages import TokenizeBlock

    todo, metas = [], {}
    for name, path, _side in jobs:
        (tok_dir / name).mkdir(parents=True, exist_ok=True)
        for k, b in enumerate(split_file(path, 0, shard_bytes)):
            prefix = tok_dir / name / f"{name}-{k:05d}"
            row = {**b.as_row(), "name": name, "shard": k, "prefix": str(prefix)}
            metas.setdefault(name, []).append(prefix)
            if not Path(str(prefix) + ".shard.json").is_file():
                todo.append(row)
    if todo:
        tok_args = ({"json_str": tok.json_str, "bos_id": tok.bos_id, "eod_id": tok.eod_id,
                     "vocab_size": tok.vocab_size, "name": tok.name},)
        todo.sort(key=lambda r: -r["nbytes"])  # big blocks first: better packing of the pool
        for _ in _map_blocks(todo, TokenizeBlock, tok_args, n_cpus).iter_batches(batch_size=None):
            pass
    return {name: [json.loads(Path(str(p) + ".shard.json").read_text()) | {"prefix": p} for p in prefixes]
            for name, prefixes in metas.items()}


def _hash_tokenizer(tok) -> str:
    return hashlib.blake2b(tok.json_str.encode(), digest_size=8).hexdigest()


__all__ = ["ray_session", "State", "fingerprint", "clean_kind", "ray_scorer", "tokenize_sources", "SHARD_BYTES"]


# ------------------------------------------------------------------------------------------------ the whole build


def build_ray(dfiles: list[Path], gfiles: list[Path], tok, out: Path, *, ratio, non_english, mix: str, budget,
              mine: bool, ccfg: CleanConfig, mcfg, plan: dict, ray_address: str | None = None,
              num_cpus: int | None = None, block_bytes: int = BLOCK_BYTES, shard_bytes: int = SHARD_BYTES,
              dedup: str = "auto") -> dict:
    """The Ray executor of :func:`ellama_recipes.data.pipeline.build` (same arguments, already checked)."""
    from ellama_recipes.data.blend import make_manifest
    from ellama_recipes.data.manifest import write_source_sidecar
    from ellama_recipes.data.mine import mine as mine_corpus
    from ellama_recipes.data.stage_io import (CLASSIFY_MAX_TRAIN, _mined_summary, _split_by_lang,
                                              serialize_stage)
    from ellama_recipes.io.atomic import write_json

    settings = {"ratio": str(ratio), "non_english": non_english, "mix": mix, "budget": budget.as_dict(),
                "mine": mine, "clean": asdict(ccfg), "mix_config": asdict(mcfg), "tokenizer": _hash_tokenizer(tok),
                "block_bytes": block_bytes, "shard_bytes": shard_bytes}
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None  # as init_ray reads it
    if dedup not in DEDUPS:
        raise UserError(f"Unknown --dedup {dedup!r}. Use one of: {', '.join(DEDUPS)}.")
    st = State(out, fingerprint(dfiles + gfiles, settings))
    st.local_ray = not ray_address
    work = st.dir / "work"
    timings: dict[str, float] = {}
    nodes: dict[str, dict] = {}
    dedups: dict[str, str] = {}
    report: dict = {"stages": []}
    with ray_session(ray_address, num_cpus) as n_cpus:
        # 1. clean
        for kind, files in (("domain", dfiles), ("general", gfiles)):
            info = clean_kind(files, kind, ccfg, st, n_cpus, block_bytes, dedup)
            report["stages"].append(info["stats"])
            nodes[f"clean_{kind}"] = info["nodes"]
            timings[f"clean_{kind}"] = info["seconds"]
            dedups[kind] = info["dedup"]
        _warm_workers(n_cpus)  # while the driver serializes and fits the classifier
        # 2. serialize (driver; deterministic and cheap, so recomputed on a resume)
        t0 = time.perf_counter()
        wheres = (work / "clean_domain.where").read_text(encoding="utf-8").splitlines()
        with open(work / "clean_domain.jsonl", encoding="utf-8") as f:
            dom_recs = [json.loads(line) | {"_src": w} for line, w in zip(f, wheres)]
        samples, domain_files = serialize_stage(dom_recs, mcfg, mix, work, report)
        del dom_recs
        timings["serialize"] = round(time.perf_counter() - t0, 2)
        # 3. classify / mine
        mined_path = work / "domain_mined.jsonl"
        n_gen = report["stages"][1]["records_out"]
        cinfo = st.done("classify")
        if cinfo is None:
            t0 = time.perf_counter()
            score_nodes: Counter = Counter()
            if mine:
                res = mine_corpus([work / "clean_general.jsonl"], [s["text"] for s in samples], work / "classify",
                                  mined_path, work, budget, tokenizer=tok, max_train=CLASSIFY_MAX_TRAIN,
                                  png=st.dir / "mining_scores.png",
                                  scorer=ray_scorer(n_cpus, block_bytes, score_nodes))
                cinfo = {"report": res.report, "kept_files": {k: str(v) for k, v in res.kept_files.items()},
                         "mined": res.mined, "kept": res.kept, "summary": _mined_summary(res)}
            else:
                kept_files, n_kept = _split_by_lang(work / "clean_general.jsonl", work, lambda n=1: None)
                cinfo = {"report": None, "kept_files": {k: str(v) for k, v in kept_files.items()}, "mined": 0,
                         "kept": n_kept, "summary": None}
            cinfo["nodes"] = dict(score_nodes)
            cinfo["seconds"] = round(time.perf_counter() - t0, 2)
            st.finish("classify", cinfo)
        del samples
        if cinfo["report"] is not None:
            report["classify"] = cinfo["report"]
        cstats = StageStats("classify (general)", records_in=n_gen, records_out=cinfo["kept"] + cinfo["mined"])
        cstats.check()
        report["stages"].append({**cstats.as_dict(), "mined_to_domain": cinfo["mined"]})
        nodes["classify"] = cinfo["nodes"]
        timings["classify"] = cinfo["seconds"]
        if cinfo["mined"]:
            domain_files["domain_mined"] = mined_path
        # 4. tokenize: one shard per block, finished shards kept across runs
        t0 = time.perf_counter()
        tok_dir = st.dir / "tokenized"
        jobs = [(name, path, "domain") for name, path in domain_files.items()] + \
               [(f"general_{lang}", Path(path), "general") for lang, path in sorted(cinfo["kept_files"].items())]
        shards = tokenize_sources(jobs, tok, tok_dir, n_cpus, shard_bytes)
    tstats = StageStats("tokenize")
    sources: list[dict] = []
    tnodes: Counter = Counter()
    with open(st.dir / "rejects" / "tokenize.jsonl", "w", encoding="utf-8") as rf:
        for name, _path, side in jobs:
            metas = shards.get(name, [])
            langs: Counter = Counter()
            for m in metas:
                langs.update(m["langs"])
            lang = name[len("general_"):] if side == "general" else \
                (langs.most_common(1)[0][0] if len(langs) == 1 else "mul")
            extra = {"mined": cinfo["summary"]} if name == "domain_mined" else {}
            for m in metas:
                tstats.records_in += m["lines_in"]
                tstats.records_out += m["documents"]
                tnodes[m["node"]] += 1
                for rj in m["rejects"]:
                    tstats.rejected[rj["reason"]] += 1
                    rf.write(json.dumps(rj, ensure_ascii=False) + "\n")
                prefix = Path(m["prefix"])
                meta = write_source_sidecar(prefix, side, lang, m["documents"], m["tokens"], source=name, **extra)
                sources.append({"prefix": str(prefix.relative_to(st.dir)), **meta})
    tstats.check()
    report["stages"].append(tstats.as_dict())
    nodes["tokenize"] = dict(tnodes)
    timings["tokenize"] = round(time.perf_counter() - t0, 2)
    # 5. blend
    rejected: Counter = Counter()
    for s in report["stages"]:
        rejected.update(s["rejected"])
    manifest = make_manifest(sources, ratio, non_english, dict(rejected))
    write_json(st.dir / "manifest.json", manifest)
    report["tokenizer"] = plan["tokenizer"]
    report["executor"] = {"kind": "ray", "address": ray_address or "local", "cpus": n_cpus,
                          "node_addresses": SESSION.get("node_addresses"),
                          "resumed": st.resumed, "dedup": dedups, "block_bytes": block_bytes, "shard_bytes": shard_bytes,
                          "seconds": {"ray_start": SESSION.get("start_s"), **timings}, "rows_per_node": nodes}
    write_json(st.dir / "report.json", report)
    st.promote()
    return manifest


# ------------------------------------------------------------------------------------------------ the subcommands


def clean_files_ray(files: list[Path], kind: str, cfg: CleanConfig, out_tmp: Path, *, ray_address=None,
                    num_cpus=None, block_bytes: int = BLOCK_BYTES, dedup: str = "auto") -> dict:
    """``ellama data clean --executor ray``: stage 1 into ``out_tmp`` (clean.jsonl, rejects.jsonl); returns the
    stage's stats dict."""
    st = State(out_tmp / "_state", {"clean": asdict(cfg), "files": [str(p) for p in files]})
    st.local_ray = not ray_address
    with ray_session(ray_address, num_cpus) as n_cpus:
        info = clean_kind(files, kind, cfg, st, n_cpus, block_bytes, dedup)
    os.replace(st.dir / "work" / f"clean_{kind}.jsonl", out_tmp / "clean.jsonl")
    os.replace(st.dir / "rejects" / f"clean_{kind}.jsonl", out_tmp / "rejects.jsonl")
    shutil.rmtree(st.dir)
    return info["stats"]


def tokenize_ray(files: list[Path], tok, out: Path, side: str, lang: str | None, *, ray_address=None,
                 num_cpus=None, shard_bytes: int = SHARD_BYTES) -> dict:
    """``ellama data tokenize --executor ray``: every block of ``files`` to its own shard ``OUT/NAME-00000`` (plus
    ``.source.json`` sidecars for ``ellama data blend``); rejects to ``OUT/rejects.jsonl``. Returns totals."""
    from ellama_recipes.data.manifest import write_source_sidecar

    out.mkdir(parents=True, exist_ok=True)
    with ray_session(ray_address, num_cpus) as n_cpus:
        metas = []
        for i, f in enumerate(files):
            name, where = (out.name, out.parent) if len(files) == 1 else (f"{out.name}_{i:03d}", out)
            metas += tokenize_sources([(name, f, side)], tok, where, n_cpus, shard_bytes).get(name, [])
    langs: Counter = Counter()
    tot = {"documents": 0, "tokens": 0, "rejected": Counter(), "shards": len(metas)}
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as rf:
        for m in metas:
            langs.update(m["langs"])
            tot["documents"] += m["documents"]
            tot["tokens"] += m["tokens"]
            for rj in m["rejects"]:
                tot["rejected"][rj["reason"]] += 1
                rf.write(json.dumps(rj, ensure_ascii=False) + "\n")
    src_lang = lang or (langs.most_common(1)[0][0] if langs else "und")
    for m in metas:
        write_source_sidecar(Path(m["prefix"]), side, src_lang, m["documents"], m["tokens"], source=out.name)
    return tot
