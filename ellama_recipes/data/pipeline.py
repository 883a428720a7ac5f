"""The whole data pipeline: clean -> serialize -> classify (mine) -> tokenize -> blend, with accounting.

CLI: ``ellama data build --domain raw/domain --general raw/general --tokenizer tok/ --out data/``

Python (what ``ellama quickstart`` calls)::

    from ellama_recipes.data.pipeline import build
    manifest = build([Path("raw/domain")], [Path("raw/general")], "tok/", Path("data"))

Output folder (written in a temporary sibling folder and renamed into place at the end, so an existing ``out`` is
replaced whole or left untouched, never half-written)::

    manifest.json               blend, sources, realized, rejected (read by `ellama pretrain --data`)
    report.json                 per-stage accounting, mix statistics, classifier and mining report (budget,
                                cut-off score, score quantiles, top mined / nearest not-mined, mined per language)
    mining_scores.png           histogram of the general documents' domain scores with the cut-off
    tokenized/PREFIX.{bin,idx}  Megatron indexed datasets (+ PREFIX.source.json sidecars)
    rejects/STAGE.jsonl         every rejected line: {"reason", "source": "file:line", "detail"}
    work/                       intermediate JSONL (cleaned, serialized, mined, per-language general) + classifier
                                (work/classify/classifier.joblib)

Every stage checks records in == records out + rejected and raises if not.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ellama_recipes.data.blend import check_non_english, make_manifest, parse_ratio
from ellama_recipes.data.clean import CleanConfig, StageStats, clean
from ellama_recipes.data.manifest import write_source_sidecar
from ellama_recipes.data.mine import Budget
from ellama_recipes.data.mine import count_lines as count_text_lines
from ellama_recipes.data.mine import mine as mine_corpus
from ellama_recipes.data.records import Reject, expand_paths, iter_file, render
from ellama_recipes.data.serialize import MIXES, MixConfig
from ellama_recipes.data.stage_io import (CLASSIFY_MAX_TRAIN, _mined_summary, _read_jsonl, _split_by_lang, _write_jsonl,
                                          serialize_stage)
from ellama_recipes.data.tokenize import load_tokenizer, tokenize_files
from ellama_recipes.io.atomic import atomic_dir as _atomic_dir
from ellama_recipes.io.atomic import write_json
from ellama_recipes.errors import UserError

EXECUTORS = ("ray", "inprocess")


class _Progress:
    """Thin wrapper over rich.progress (or nothing when progress=False)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, description: str, total: int | None):
        if self._p is None:
            return lambda n=1: None
        tid = self._p.add_task(description, total=total)
        return lambda n=1: self._p.advance(tid, n)


def count_lines(paths: list[Path]) -> int:
    """Records in ``paths``: Parquet rows from the metadata, JSONL lines by mine's byte counter."""
    import pyarrow.parquet as pq

    parquet = [p for p in paths if p.suffix == ".parquet"]
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parquet) + count_text_lines(
        [p for p in paths if p.suffix != ".parquet"]
    )


class RejectSink:
    """Appends rejects of one stage to ``rejects/STAGE.jsonl`` and counts them."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "w", encoding="utf-8")
        self.counts: Counter = Counter()

    def __call__(self, rj: Reject) -> None:
        self.counts[rj.reason] += 1
        self._f.write(json.dumps(rj.as_dict(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()


def atomic_dir(out: Path):
    """The output folder written atomically; an existing one is replaced only once the new one is complete."""
    return _atomic_dir(out, replace=True)


def clean_stage(paths: list[Path], kind: str, cfg: CleanConfig, rejects_path: Path, out_path: Path | None,
                prog: _Progress) -> tuple[list[dict] | int, StageStats]:
    """Clean ``paths``; returns (records, stats) for domain (kept in memory for the graph) or (count, stats) with
    records streamed to ``out_path`` for general."""
    stats = StageStats(f"clean {kind}")
    sink = RejectSink(rejects_path)
    advance = prog.task(f"clean {kind}", count_lines(paths))

    def items():
        for p in paths:
            for it in iter_file(p, kind):
                advance()
                yield it

    try:
        stream = clean(items(), cfg, stats, on_reject=sink)
        if kind == "domain":
            recs = list(stream)
            if out_path is not None:
                _write_jsonl(out_path, recs)
            result: list[dict] | int = recs
        else:
            result = _write_jsonl(out_path, stream)
    finally:
        sink.close()
    if stats.records_out == 0:
        raise UserError(f"No valid {kind} record in {', '.join(map(str, paths))}: all {stats.records_in} lines were "
                        f"rejected ({dict(stats.rejected)}). See {rejects_path} for each line's reason; fix the input "
                        "format (JSON Lines, schema in `ellama data build --help`).")
    return result, stats


def plan(domain: list[Path], general: list[Path], tokenizer: str | Path, out: Path, ratio="1:1", non_english=0.10,
         mix="graph", workers=1) -> dict:
    """Resolve and check every input without writing anything (``--dryrun``)."""
    r = parse_ratio(ratio)
    q = check_non_english(non_english)
    if mix not in MIXES:
        raise UserError(f"Unknown --mix {mix!r}. Use one of: {', '.join(MIXES)}.")
    dfiles = expand_paths(domain, "--domain")
    gfiles = expand_paths(general, "--general")
    tok = load_tokenizer(tokenizer)
    return {
        "domain_files": [str(p) for p in dfiles],
        "general_files": [str(p) for p in gfiles],
        "input_bytes": sum(p.stat().st_size for p in dfiles + gfiles),
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eod_id": tok.eod_id},
        "out": str(out),
        "general_to_domain_ratio": r,
        "non_english": q,
        "mix": mix,
        "workers": workers,
        "stages": ["clean", "serialize", "classify", "tokenize", "blend"],
    }


def build(domain: list[Path], general: list[Path], tokenizer: str | Path, out: Path, ratio="1:1",
          non_english=0.10, mix="graph", workers=1, progress=True, *, threshold: float | None = None,
          mine_fraction: float | None = None, mine_tokens: int | None = None, mine: bool = True,
          clean_config: CleanConfig | None = None, mix_config: MixConfig | None = None,
          executor: str = "inprocess", ray_address: str | None = None, num_cpus: int | None = None,
          block_bytes: int | None = None, shard_bytes: int | None = None, dedup: str = "auto") -> dict:
    """Run every stage and write ``out`` atomically; returns the manifest dict (also in ``out/manifest.json``;
    the per-stage accounting is ``out/report.json``).

    Mining takes one budget: ``mine_fraction`` (top share of the general documents), ``mine_tokens`` (top documents
    up to that many tokens) or ``threshold`` (p(domain) >= threshold; the default, 0.5, when none is given).

    ``executor``: ``"ray"`` runs the stages as Ray Data pipelines (:mod:`ellama_recipes.data.ray_build`; a local
    loopback Ray instance with ``num_cpus`` CPUs, or the cluster at ``ray_address``; resumable; tokenized sources
    written as shards); ``"inprocess"`` (this function's default, what the quickstart and the test fixtures use)
    the sequential pipeline below. ``ellama data build`` defaults to ``ray``."""
    if executor not in EXECUTORS:
        raise UserError(f"Unknown --executor {executor!r}. Use one of: {', '.join(EXECUTORS)} (slurm submits a "
                        "`ray` build through NeMo-Run).")
    if ray_address and executor != "ray":
        raise UserError(f"--ray-address {ray_address} needs --executor ray (got {executor}).")
    budget = Budget(fraction=mine_fraction, tokens=mine_tokens, threshold=threshold)
    p = plan(domain, general, tokenizer, out, ratio, non_english, mix, workers)
    dfiles = [Path(x) for x in p["domain_files"]]
    gfiles = [Path(x) for x in p["general_files"]]
    tok = load_tokenizer(tokenizer)
    ccfg = clean_config or CleanConfig()
    mcfg = mix_config or MixConfig(mix=mix)
    mcfg.mix = mix
    if executor == "ray":
        from ellama_recipes.data import ray_build

        kw = {k: v for k, v in (("block_bytes", block_bytes), ("shard_bytes", shard_bytes)) if v}
        return ray_build.build_ray(dfiles, gfiles, tok, Path(out), ratio=ratio, non_english=non_english, mix=mix,
                                   budget=budget, mine=mine, ccfg=ccfg, mcfg=mcfg, plan=p, ray_address=ray_address,
                                   num_cpus=num_cpus, dedup=dedup, **kw)
    report: dict = {"stages": []}
    with atomic_dir(Path(out)) as tmp, _Progress(progress) as prog:
        work = tmp / "work"
        # 1. clean
        dom_recs, dstats = clean_stage(dfiles, "domain", ccfg, tmp / "rejects/clean_domain.jsonl",
                                       work / "clean_domain.jsonl", prog)
        n_gen, gstats = clean_stage(gfiles, "general", ccfg, tmp / "rejects/clean_general.jsonl",
                                    work / "clean_general.jsonl", prog)
        report["stages"] += [dstats.as_dict(), gstats.as_dict()]
        # 2. serialize
        adv = prog.task(f"serialize ({mix})", 1)
        samples, domain_files = serialize_stage(dom_recs, mcfg, mix, work, report)
        adv()
        del dom_recs
        # 3. classify: mine domain-like documents out of the general corpus (streamed; see data/mine.py)
        gen_by_lang: dict[str, Path] = {}
        mined_path = work / "domain_mined.jsonl"
        mine_res = None
        if mine:
            mine_res = mine_corpus([work / "clean_general.jsonl"], [s["text"] for s in samples], work / "classify",
                                   mined_path, work, budget, workers=workers, tokenizer=tok,
                                   max_train=CLASSIFY_MAX_TRAIN, png=tmp / "mining_scores.png", progress=prog.task)
            report["classify"] = mine_res.report
            gen_by_lang = dict(mine_res.kept_files)
            n_mined, n_kept = mine_res.mined, mine_res.kept
        else:
            gen_by_lang, n_kept = _split_by_lang(work / "clean_general.jsonl", work, prog.task("split general", n_gen))
            n_mined = 0
        cstats = StageStats("classify (general)", records_in=n_gen, records_out=n_kept + n_mined)
        cstats.check()
        report["stages"].append({**cstats.as_dict(), "mined_to_domain": n_mined})
        if n_mined:
            domain_files["domain_mined"] = mined_path
        # 4. tokenize
        tok_dir = tmp / "tokenized"
        tok_dir.mkdir()
        sources: list[dict] = []
        tsink = RejectSink(tmp / "rejects/tokenize.jsonl")
        jobs = [(name, path, "domain") for name, path in domain_files.items()] + \
               [(f"general_{lang}", path, "general") for lang, path in sorted(gen_by_lang.items())]
        total_bytes = sum(path.stat().st_size for _, path, _ in jobs)
        adv = prog.task(f"tokenize ({workers} worker{'s' if workers > 1 else ''})", total_bytes)
        tstats = StageStats("tokenize")
        try:
            for name, path, side in jobs:
                res = tokenize_files([path], tok, tok_dir / name, workers=workers, on_reject=tsink, progress=adv)
                tstats.records_in += res.lines_in
                tstats.records_out += res.documents
                tstats.rejected.update(res.rejected)
                if side == "general":
                    lang = name[len("general_"):]
                else:
                    langs = res.langs
                    lang = langs.most_common(1)[0][0] if len(langs) == 1 else "mul"
                extra = {"mined": _mined_summary(mine_res)} if name == "domain_mined" else {}
                meta = write_source_sidecar(tok_dir / name, side, lang, res.documents, res.tokens, **extra)
                sources.append({"prefix": f"tokenized/{name}", **meta})
        finally:
            tsink.close()
        tstats.check()
        report["stages"].append(tstats.as_dict())
        # 5. blend
        rejected: Counter = Counter()
        for st in report["stages"]:
            rejected.update(st["rejected"])
        manifest = make_manifest(sources, ratio, non_english, dict(rejected))
        write_json(tmp / "manifest.json", manifest)
        report["tokenizer"] = p["tokenizer"]
        write_json(tmp / "report.json", report)
    return manifest


def stage_table(report: dict):
    """A rich Table of per-stage accounting."""
    from rich.table import Table

    t = Table(title="ellama data: records per stage")
    t.add_column("stage")
    t.add_column("in", justify="right")
    t.add_column("out", justify="right")
    t.add_column("rejected", justify="right")
    t.add_column("reasons")
    for st in report["stages"]:
        rej = st["rejected"]
        t.add_row(st["stage"], str(st["records_in"]), str(st["records_out"]), str(sum(rej.values())),
                  ", ".join(f"{k} {v}" for k, v in sorted(rej.items(), key=lambda kv: -kv[1])) or "-")
    return t


__all__ = ["build", "plan", "stage_table", "atomic_dir", "clean_stage", "count_lines", "RejectSink", "render"]
