"""`ellama data ...`: prepare, classify, tokenize and blend training data (issue 3).

No business logic here: every command calls into :mod:`ellama_recipes.data`. The helpers the commands share (help
texts, overrides, the executor check, report lines) live in cli/data_common.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ellama_recipes.cli.common import console, print_json
from ellama_recipes.cli.app import app
# the shared help texts, override parsing, executor check and report lines live in cli/data_common.py
from ellama_recipes.cli.data_common import (EXECUTOR_HELP, RAY_ADDRESS_HELP, RECORD_SCHEMA,  # noqa: F401
                                           _apply_overrides, _executor, _mining_line, _print_table)
from ellama_recipes.errors import UserError

data_app = typer.Typer(
    help="Prepare and blend domain and general data into Megatron indexed datasets.\n\n"
    "Stages: clean -> serialize -> classify -> tokenize -> blend; `build` runs them all.\n\n"
    "Example:  ellama data build --domain raw/domain --general raw/general --tokenizer tok/ --out data/",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command(
    "build",
    help="Run every stage: clean, serialize (graph mix), classify (mine domain text from the general corpus), "
    "tokenize (Megatron .bin/.idx) and blend (manifest.json).\n\n"
    f"{RECORD_SCHEMA}\n\n"
    "Mining takes one budget: --mine-fraction F (the top-scoring share F of the general documents), --mine-tokens N "
    "(top-scoring documents up to N tokens) or --threshold P (p(domain) >= P; the default, 0.5). Mined documents are "
    "tokenized as their own domain source (tokenized/domain_mined) and the manifest says how they were mined; "
    "report.json and mining_scores.png show the score distribution, the top mined and the nearest not-mined "
    "documents.\n\n"
    "Trailing key=value pairs override stage settings, e.g. clean.min_chars=20 mix.max_chars=3000 "
    "(see them with --dryrun).\n\n"
    "Example:  ellama data build --domain raw/domain --general raw/general --tokenizer tok/ --out data/ --ratio 1:1 "
    "--mine-fraction 0.02",
)
def build(
    domain: List[Path] = typer.Option(..., "--domain", help="Domain records: file(s) or folder(s) of .jsonl/.parquet."),
    general: List[Path] = typer.Option(..., "--general", help="General documents: file(s) or folder(s)."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="HF tokenizer directory or Hub id."),
    out: Path = typer.Option(..., "--out", help="Output folder (replaced atomically)."),
    ratio: str = typer.Option("1:1", "--ratio", help="General:domain token ratio of the blend."),
    non_english: float = typer.Option(0.10, "--non-english", help="Non-English share of the general side's tokens."),
    mix: str = typer.Option("graph", "--mix", help="graph (EcomGPT-CT) or separate."),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPUs: tokenizer/scoring processes (inprocess, "
                                          "default 1) or the local Ray instance's CPUs (ray, default: all cores)."),
    executor: str = typer.Option("ray", "--executor", help=EXECUTOR_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    dedup: str = typer.Option("auto", "--dedup", help="ray: dedup by Ray shuffles (data.dedup.find_duplicates); "
                              "local: on the driver (same decisions); auto: local on a local Ray instance up to "
                              "200,000 records per kind, else ray."),
    block_mb: float = typer.Option(4.0, "--block-mb", help="Ray: at most this many MiB of input per block (one task; "
                                  "smaller for a small input so every CPU gets one)."),
    shard_mb: float = typer.Option(16.0, "--shard-mb", help="Ray: MiB of input per tokenized shard (.bin/.idx)."),
    no_mine: bool = typer.Option(False, "--no-mine", help="Skip mining domain documents from the general corpus."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Mine general documents with p(domain) >= P "
                                              "(default 0.5 when no budget is given)."),
    mine_fraction: Optional[float] = typer.Option(None, "--mine-fraction", help="Mine the top-scoring share F of the "
                                                  "general documents (e.g. 0.02)."),
    mine_tokens: Optional[int] = typer.Option(None, "--mine-tokens", help="Mine top-scoring general documents up to "
                                              "N tokens (counted with --tokenizer)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Check inputs and print the resolved plan; write nothing."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value stage settings, e.g. clean.min_chars=20"),
) -> None:
    from ellama_recipes.data import pipeline
    from ellama_recipes.data.clean import CleanConfig
    from ellama_recipes.data.mine import Budget
    from ellama_recipes.data.serialize import MixConfig

    _executor(executor, ray_address, ("ray", "inprocess", "slurm"))
    ccfg, mcfg = CleanConfig(), MixConfig(mix=mix)
    cluster_overrides = [o for o in overrides or [] if o.startswith("cluster.")]
    if cluster_overrides and executor != "slurm":
        raise UserError(f"{cluster_overrides[0]}: cluster.* keys configure --executor slurm only.")
    settings = _apply_overrides([o for o in overrides or [] if not o.startswith("cluster.")],
                                {"clean": ccfg, "mix": mcfg})
    budget = Budget(fraction=mine_fraction, tokens=mine_tokens, threshold=threshold)
    if executor == "slurm":
        from ellama_recipes.workflows.data_launch import submit_build

        argv = ["data", "build", *[x for d in domain for x in ("--domain", str(Path(d).absolute()))],
                *[x for g in general for x in ("--general", str(Path(g).absolute()))],
                "--tokenizer", str(Path(tokenizer).absolute()) if Path(tokenizer).exists() else tokenizer,
                "--out", str(Path(out).absolute()), "--ratio", ratio, "--non-english", str(non_english),
                "--mix", mix, "--dedup", dedup, "--block-mb", str(block_mb), "--shard-mb", str(shard_mb)]
        argv += ["--no-mine"] if no_mine else []
        for flag, val in (("--threshold", threshold), ("--mine-fraction", mine_fraction),
                          ("--mine-tokens", mine_tokens)):
            argv += [flag, str(val)] if val is not None else []
        argv += [o for o in overrides or [] if not o.startswith("cluster.")]
        res = submit_build(cluster_overrides, argv, out, dryrun=dryrun)
        print_json({k: v for k, v in res.items() if k != "script"})
        if "script" in res:  # the sbatch script NeMo-Run submits, verbatim
            print(res["script"])
        return
    if dryrun:
        plan = pipeline.plan(domain, general, tokenizer, out, ratio, non_english, mix, workers or 1)
        plan["settings"] = settings
        plan["mine"] = budget.as_dict() if not no_mine else False
        plan["executor"] = {"kind": executor, "ray_address": ray_address or ("local" if executor == "ray" else None)}
        print_json(plan)
        return
    local_ray = executor == "ray" and not ray_address
    manifest = pipeline.build(domain, general, tokenizer, out, ratio=ratio, non_english=non_english, mix=mix,
                              workers=(workers or 1) if executor == "inprocess" else 1, progress=True,
                              threshold=threshold, mine_fraction=mine_fraction,
                              mine_tokens=mine_tokens, mine=not no_mine, clean_config=ccfg, mix_config=mcfg,
                              executor=executor, ray_address=ray_address, num_cpus=workers if local_ray else None,
                              dedup=dedup, block_bytes=int(block_mb * (1 << 20)), shard_bytes=int(shard_mb * (1 << 20)))
    report = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))  # the build's accounting
    _print_table(report)
    r = manifest["realized"]
    extra = ""
    if "classify" in report:
        extra = "; " + _mining_line(report["classify"])
    console.print(f"Wrote {out}/manifest.json: {len(manifest['sources'])} sources, general:domain "
                  f"{r['general_to_domain_token_ratio']}, non-English {r['non_english_share_of_general']}{extra}.")


@data_app.command(
    "clean",
    help="Normalise (NFKC, HTML/boilerplate strip), filter (length, quality), dedup (exact + MinHash LSH) and "
    "language-identify records. Writes OUT/clean.jsonl, OUT/rejects.jsonl, OUT/report.json.\n\n"
    f"{RECORD_SCHEMA}\n\n"
    "Example:  ellama data clean --kind domain --input raw/domain --out work/clean_domain",
)
def clean_cmd(
    input: List[Path] = typer.Option(..., "--input", help="File(s) or folder(s) of .jsonl/.parquet."),
    kind: str = typer.Option(..., "--kind", help="domain (product/review/article records) or general ({text, lang?})."),
    out: Path = typer.Option(..., "--out", help="Output folder (replaced atomically)."),
    executor: str = typer.Option("ray", "--executor", help=EXECUTOR_HELP.split(" or slurm")[0] + ")."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPUs of the local Ray instance (default: all)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the resolved settings; write nothing."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value, e.g. clean.min_chars=20"),
) -> None:
    from ellama_recipes.data.clean import CleanConfig
    from ellama_recipes.data.pipeline import _Progress, atomic_dir, clean_stage
    from ellama_recipes.data.records import expand_paths

    if kind not in ("domain", "general"):
        raise UserError(f"--kind {kind!r} must be domain or general.")
    cfg = CleanConfig()
    settings = _apply_overrides(overrides, {"clean": cfg})
    files = expand_paths(input, "--input")
    if dryrun:
        print_json({"input_files": [str(p) for p in files], "kind": kind, "out": str(out), "settings": settings})
        return
    _executor(executor, ray_address)
    with atomic_dir(out) as tmp:
        if executor == "ray":
            from ellama_recipes.data.ray_build import clean_files_ray

            sd = clean_files_ray(files, kind, cfg, tmp, ray_address=ray_address,
                                 num_cpus=workers if not ray_address else None)
        else:
            with _Progress(True) as prog:
                _, stats = clean_stage(files, kind, cfg, tmp / "rejects.jsonl", tmp / "clean.jsonl", prog)
            sd = stats.as_dict()
        (tmp / "report.json").write_text(json.dumps({"stages": [sd]}, indent=2) + "\n")
    _print_table({"stages": [sd]})


@data_app.command(
    "serialize",
    help="Serialize cleaned domain records into training text: --mix graph (EcomGPT-CT: records sharing product "
    "ids are clustered, covering as many sources as possible within a size range, shuffled, concatenated, each "
    "used once) or --mix separate (one sample per record). Writes OUT/domain.jsonl and OUT/report.json.\n\n"
    "Example:  ellama data serialize --input work/clean_domain/clean.jsonl --out work/serialized --mix graph",
)
def serialize_cmd(
    input: List[Path] = typer.Option(..., "--input", help="Cleaned domain records (JSONL)."),
    out: Path = typer.Option(..., "--out", help="Output folder (replaced atomically)."),
    mix: str = typer.Option("graph", "--mix", help="graph or separate."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the resolved settings; write nothing."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value, e.g. mix.max_chars=3000"),
) -> None:
    from ellama_recipes.data.clean import StageStats
    from ellama_recipes.data.pipeline import RejectSink, _write_jsonl, atomic_dir
    from ellama_recipes.data.records import expand_paths, iter_file
    from ellama_recipes.data.serialize import MixConfig, mix_stats, serialize

    cfg = MixConfig(mix=mix)
    settings = _apply_overrides(overrides, {"mix": cfg})
    files = expand_paths(input, "--input")
    if dryrun:
        print_json({"input_files": [str(p) for p in files], "out": str(out), "settings": settings})
        return
    with atomic_dir(out) as tmp:
        stats = StageStats("serialize")
        sink = RejectSink(tmp / "rejects.jsonl")
        recs = []
        for p in files:
            for rec, rj in iter_file(p, "domain"):
                stats.records_in += 1
                if rj is not None:
                    stats.rejected[rj.reason] += 1
                    sink(rj)
                else:
                    recs.append(rec)
        sink.close()
        if not recs:
            raise UserError(f"No valid domain record in {', '.join(map(str, files))}. Pass the clean.jsonl written by "
                            "`ellama data clean --kind domain`.")
        samples = serialize(recs, cfg)
        stats.records_out = sum(len(s["records"]) for s in samples)
        stats.check()
        _write_jsonl(tmp / "domain.jsonl", samples)
        report = {"stages": [stats.as_dict()], "mix": {"strategy": cfg.mix, **mix_stats(samples)}}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    console.print(f"{report['mix']['samples']} samples, {report['mix']['mean_sources_per_sample']:.2f} sources per "
                  f"sample ({cfg.mix}).")


@data_app.command(
    "classify",
    help="Train the e-commerce domain classifier (scikit-learn: hashed word 1-2 grams + multinomial naive Bayes, "
    "cross-fitted) on domain vs general text and mine the top-scoring general documents. The general corpus is "
    "streamed (any size; --workers processes score it). Give one budget: --mine-fraction F (top share of general "
    "documents), --mine-tokens N (top documents up to N tokens; needs --tokenizer) or --threshold P "
    "(p(domain) >= P; the default, 0.5). Writes OUT/mined.jsonl (with scores), OUT/general_<lang>.jsonl (the rest, "
    "one file per language), OUT/classifier.joblib, OUT/report.json (budget, cut-off, score quantiles, top mined "
    "and nearest not-mined documents, mined per language), OUT/mining_scores.png, OUT/rejects.jsonl.\n\n"
    "Example:  ellama data classify --domain work/serialized/domain.jsonl --general raw/general --out work/classify "
    "--mine-fraction 0.02 --workers 2",
)
def classify_cmd(
    domain: List[Path] = typer.Option(..., "--domain", help="Domain text: serialized samples or domain records."),
    general: List[Path] = typer.Option(..., "--general", help="General documents {text, lang?} (JSONL)."),
    out: Path = typer.Option(..., "--out", help="Output folder (replaced atomically)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Mine documents with p(domain) >= P."),
    mine_fraction: Optional[float] = typer.Option(None, "--mine-fraction", help="Mine the top-scoring share F."),
    mine_tokens: Optional[int] = typer.Option(None, "--mine-tokens", help="Mine top documents up to N tokens."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="HF tokenizer (counts tokens for --mine-tokens)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Scoring processes (inprocess, default 1) or the "
                                          "local Ray instance's CPUs (ray, default: all cores)."),
    executor: str = typer.Option("ray", "--executor", help=EXECUTOR_HELP.split(" or slurm")[0] + ")."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    max_train: int = typer.Option(20_000, "--max-train", help="General documents (an even sample) to train on."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the resolved settings; write nothing."),
) -> None:
    from ellama_recipes.data.mine import Budget, mine
    from ellama_recipes.data.pipeline import RejectSink, _Progress, atomic_dir
    from ellama_recipes.data.records import expand_paths, iter_text_rows

    budget = Budget(fraction=mine_fraction, tokens=mine_tokens, threshold=threshold)
    if budget.kind == "tokens" and tokenizer is None:
        raise UserError("--mine-tokens counts tokens with a tokenizer: add --tokenizer DIR (the one you will tokenize "
                        "with), or use --mine-fraction F instead.")
    dfiles = expand_paths(domain, "--domain")
    gfiles = expand_paths(general, "--general")
    if any(p.suffix != ".jsonl" for p in gfiles):
        raise UserError("classify streams JSON Lines: convert Parquet general data with `ellama data clean --kind "
                        "general` first.")
    tok = None
    if tokenizer is not None:
        from ellama_recipes.data.tokenize import load_tokenizer

        tok = load_tokenizer(tokenizer)
    if dryrun:
        print_json({"domain_files": [str(p) for p in dfiles], "general_files": [str(p) for p in gfiles],
                    "out": str(out), "budget": budget.as_dict(), "workers": workers, "max_train": max_train})
        return
    _executor(executor, ray_address)
    d_texts = [r["text"] for p in dfiles for r in iter_text_rows(p)]
    import contextlib

    with atomic_dir(out) as tmp, _Progress(executor == "inprocess") as prog:
        sink = RejectSink(tmp / "rejects.jsonl")
        try:
            with contextlib.ExitStack() as stack:
                scorer = None
                if executor == "ray":  # scored by Ray tasks holding the fitted models
                    from ellama_recipes.data.ray_build import ray_scorer, ray_session

                    scorer = ray_scorer(stack.enter_context(
                        ray_session(ray_address, workers if not ray_address else None)))
                res = mine(gfiles, d_texts, tmp, tmp / "mined.jsonl", tmp, budget, workers=workers or 1,
                           tokenizer=tok, max_train=max_train, png=tmp / "mining_scores.png", progress=prog.task,
                           on_reject=sink, scorer=scorer)
        finally:
            sink.close()
        rep = res.report
        rep["accounting"] = {"general_lines_in": res.lines, "mined": res.mined, "kept": res.kept,
                             "rejected": dict(res.rejected)}
        (tmp / "report.json").write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
    h = rep["classifier"]["held_out_domain_vs_general"]
    console.print(f"Catalog-vs-general held-out precision {h['precision']:.3f}, recall {h['recall']:.3f} "
                  f"({rep['classifier']['folds']}-fold; the easy task). {_mining_line(rep)[0].upper()}"
                  f"{_mining_line(rep)[1:]}. Lines in {res.lines} = mined {res.mined} + kept {res.kept} + rejected "
                  f"{sum(res.rejected.values())}. See {out}/report.json and {out}/mining_scores.png.")


@data_app.command(
    "tokenize",
    help="Tokenize JSONL documents ({text, lang?}) into a Megatron indexed dataset OUT.bin/OUT.idx (megatron-core's "
    "builder, <bos> text <eod> per document, streaming, multi-process) plus OUT.source.json for `ellama data "
    "blend`.\n\n"
    "Example:  ellama data tokenize --input work/general_en.jsonl --tokenizer tok/ --out data/tokenized/general_en "
    "--side general --lang en --workers 2",
)
def tokenize_cmd(
    input: List[Path] = typer.Option(..., "--input", help="JSONL file(s) or folder(s) with a text field."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="HF tokenizer directory or Hub id."),
    out: Path = typer.Option(..., "--out", help="Output prefix (writes PREFIX.bin, PREFIX.idx, PREFIX.source.json)."),
    side: str = typer.Option(..., "--side", help="domain or general (recorded for blend and per-side validation)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language code of the source (default: most common)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (inprocess, default 1) or "
                                          "the local Ray instance's CPUs (ray, default: all cores)."),
    executor: str = typer.Option("ray", "--executor", help="ray (default: one shard OUT/NAME-00000.bin/.idx per "
                                 "block, written in parallel by Ray tasks; local Ray unless --ray-address) or "
                                 "inprocess (one OUT.bin/.idx)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS", help=RAY_ADDRESS_HELP),
    shard_mb: float = typer.Option(16.0, "--shard-mb", help="Ray: MiB of input per shard."),
    text_key: str = typer.Option("text", "--text-key", help="JSON field holding the text."),
    no_bos: bool = typer.Option(False, "--no-bos", help="Do not start documents with bos (Megatron-LM's default)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Check inputs and tokenizer; write nothing."),
) -> None:
    import os

    from ellama_recipes.data.manifest import write_source_sidecar
    from ellama_recipes.data.pipeline import RejectSink, _Progress
    from ellama_recipes.data.records import expand_paths
    from ellama_recipes.data.tokenize import load_tokenizer, tokenize_files

    if side not in ("domain", "general"):
        raise UserError(f"--side {side!r} must be domain or general.")
    files = expand_paths(input, "--input")
    if any(p.suffix != ".jsonl" for p in files):
        raise UserError("tokenize reads JSON Lines; convert Parquet with `ellama data clean` first.")
    tok = load_tokenizer(tokenizer)
    if dryrun:
        print_json({"input_files": [str(p) for p in files], "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                    "out": str(out), "side": side, "workers": workers})
        return
    _executor(executor, ray_address)
    if executor == "ray":
        if text_key != "text" or no_bos:
            raise UserError("--text-key and --no-bos are supported with --executor inprocess only.")
        from ellama_recipes.data.ray_build import tokenize_ray

        tot = tokenize_ray(files, tok, out, side, lang, ray_address=ray_address,
                           num_cpus=workers if not ray_address else None, shard_bytes=int(shard_mb * (1 << 20)))
        if tot["documents"] == 0:
            raise UserError(f"No valid document in {', '.join(map(str, files))} (rejected: {dict(tot['rejected'])}); "
                            f"see {out}/rejects.jsonl.")
        console.print(f"Wrote {tot['shards']} shards under {out}/: {tot['documents']} documents, {tot['tokens']} "
                      f"tokens" + (f"; rejected {dict(tot['rejected'])} (see {out}/rejects.jsonl)"
                                   if tot["rejected"] else "") + ".")
        return
    workers = workers or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out.parent / f".{out.name}.tmp{os.getpid()}"
    sink = RejectSink(out.parent / f"{out.name}.rejects.jsonl")
    try:
        with _Progress(True) as prog:
            adv = prog.task(f"tokenize {out.name}", sum(p.stat().st_size for p in files))
            res = tokenize_files(files, tok, tmp_prefix, workers=workers, text_key=text_key, on_reject=sink,
                                 progress=adv, add_bos=not no_bos)
    except BaseException:
        for ext in (".bin", ".idx"):
            Path(str(tmp_prefix) + ext).unlink(missing_ok=True)
        raise
    finally:
        sink.close()
    if res.documents == 0:
        for ext in (".bin", ".idx"):
            Path(str(tmp_prefix) + ext).unlink(missing_ok=True)
        raise UserError(f"No valid document in {', '.join(map(str, files))} (rejected: {dict(res.rejected)}); see "
                        f"{sink.path}.")
    src_lang = lang or (res.langs.most_common(1)[0][0] if res.langs else "und")
    from ellama_recipes.io.atomic import replace_all

    replace_all([(str(tmp_prefix) + ext, str(out) + ext) for ext in (".bin", ".idx")])
    write_source_sidecar(out, side, src_lang, res.documents, res.tokens)
    console.print(f"Wrote {out}.bin/.idx: {res.documents} documents, {res.tokens} tokens"
                  + (f"; rejected {dict(res.rejected)} (see {sink.path})" if res.rejected else "") + ".")


@data_app.command(
    "blend",
    help="Compute token-aware Megatron blend weights over the tokenized sources under FOLDER (their *.source.json) "
    "so the realised general:domain token ratio is --ratio and non-English is --non-english of the general side; "
    "writes FOLDER/manifest.json (blend, sources, realized, rejected).\n\n"
    "Example:  ellama data blend data/ --ratio 1:1 --non-english 0.10",
)
def blend_cmd(
    folder: Path = typer.Argument(..., help="Folder holding tokenized sources (searched recursively)."),
    ratio: str = typer.Option("1:1", "--ratio", help="General:domain token ratio."),
    non_english: float = typer.Option(0.10, "--non-english", help="Non-English share of the general side."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the manifest; do not write it."),
) -> None:
    from ellama_recipes.data.blend import make_manifest
    from ellama_recipes.data.manifest import read_source_sidecars
    from ellama_recipes.io.atomic import write_json

    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a folder. Pass the folder holding the tokenized .bin/.idx files.")
    sources = read_source_sidecars(folder)
    rejected: dict[str, int] = {}
    for rp in folder.rglob("*rejects*.jsonl"):
        with open(rp, encoding="utf-8") as f:
            for line in f:
                reason = json.loads(line)["reason"]
                rejected[reason] = rejected.get(reason, 0) + 1
    manifest = make_manifest(sources, ratio, non_english, rejected)
    if dryrun:
        print_json(manifest)
        return
    write_json(folder / "manifest.json", manifest)
    r = manifest["realized"]
    console.print(f"Wrote {folder}/manifest.json: {len(manifest['sources'])} sources, general:domain "
                  f"{r['general_to_domain_token_ratio']}, non-English {r['non_english_share_of_general']}.")


@data_app.command(
    "train-tokenizer",
    help="Train a Llama-3-style byte-level BPE tokenizer (Llama 3.1 special tokens and chat template, exact size) "
    "on the bundled sample (default) or on --input JSONL, and save an HF tokenizer directory.\n\n"
    "Example:  ellama data train-tokenizer --out checkpoints/tokenizer --vocab-size 4096",
)
def train_tokenizer_cmd(
    out: Path = typer.Option(..., "--out", help="Output tokenizer directory."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Exact tokenizer size (must equal the model's)."),
    input: Optional[List[Path]] = typer.Option(None, "--input", help="JSONL files/folders (default: bundled sample)."),
) -> None:
    from ellama_recipes.data.pipeline import atomic_dir
    from ellama_recipes.data.clean import iter_jsonl_texts
    from ellama_recipes.data.records import expand_paths
    from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer

    if input:
        files = expand_paths(input, "--input")

        def texts():
            for p in files:
                yield from iter_jsonl_texts(p)

        it = texts()
    else:
        it = sample_texts()
    with atomic_dir(out) as tmp:
        train_tokenizer(it, tmp, vocab_size=vocab_size)
    console.print(f"Wrote tokenizer ({vocab_size} tokens) to {out}.")
