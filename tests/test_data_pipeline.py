"""`ellama data`: every stage on small inputs, every bad-input kind, graph-mix invariants, blend ratios, read-back
through megatron-core's IndexedDataset, atomic output. About 60 s (one full build on the bundled sample through the
real CLI, shared by the tests through a session fixture; megatron-core import is ~10 s of it)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ellama_recipes.data import records as R
from ellama_recipes.data.blend import make_manifest, parse_ratio
from ellama_recipes.data.clean import CleanConfig, StageStats, clean, normalize_text
from ellama_recipes.data.bundled import sample_dir
from ellama_recipes.data.serialize import MixConfig, product_ids, serialize
from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer
from ellama_recipes.errors import UserError

SAMPLE = sample_dir()
BAD_DOMAIN = SAMPLE / "bad/domain_bad.jsonl"
BAD_GENERAL = SAMPLE / "bad/general_bad.jsonl"


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> Path:
    return train_tokenizer(sample_texts(), tmp_path_factory.mktemp("tok"), vocab_size=4096)


@pytest.fixture(scope="session")
def built(tmp_path_factory, tok) -> Path:
    """One full `ellama data build` over the sample plus the bad-input files, through the CLI entry point."""
    from ellama_recipes.cli.main import main

    out = tmp_path_factory.mktemp("build") / "data"
    code = main(["data", "build", "--executor", "inprocess", "--domain", str(SAMPLE / "domain"), "--domain", str(BAD_DOMAIN),
                 "--general", str(SAMPLE / "general"), "--general", str(BAD_GENERAL),
                 "--tokenizer", str(tok), "--out", str(out)])
    assert code == 0
    return out


def _clean_items(paths, kind):
    for p in R.expand_paths(paths):
        yield from R.iter_file(p, kind)


@pytest.fixture(scope="session")
def clean_domain() -> list[dict]:
    st = StageStats("clean")
    recs = list(clean(_clean_items([SAMPLE / "domain"], "domain"), CleanConfig(), st))
    return recs


# ---------------------------------------------------------------------------------------------------- records/clean


def test_every_bad_input_kind_is_rejected_with_file_and_line():
    got = [(rj.reason, rj.source) for rec, rj in R.iter_file(BAD_DOMAIN, "domain") if rj is not None]
    reasons = Counter(r for r, _ in got)
    for kind in ("malformed_json", "missing_field", "wrong_type", "invalid_utf8", "empty_text", "unknown_type",
                 "not_an_object", "blank_line"):
        assert reasons[kind] >= 1, kind
    assert all(src.startswith(str(BAD_DOMAIN) + ":") and src.rsplit(":", 1)[1].isdigit() for _, src in got)
    g = Counter(rj.reason for rec, rj in R.iter_file(BAD_GENERAL, "general") if rj is not None)
    assert g == Counter({"malformed_json": 1, "missing_field": 1, "wrong_type": 2, "invalid_utf8": 1, "empty_text": 1})


def test_clean_counts_duplicates_and_balances():
    st = StageStats("clean")
    rejects = []
    out = list(clean(_clean_items([BAD_DOMAIN, BAD_GENERAL.parent / "domain_bad.jsonl"], "domain"), CleanConfig(min_chars=5),
                     st, rejects))
    assert st.records_in == 24 and st.records_in == st.records_out + sum(st.rejected.values())
    assert st.rejected["exact_duplicate"] >= 1 and st.rejected["duplicate_id"] >= 1
    assert len(out) == st.records_out == 2  # one product, one review survive; the second file is all duplicates


def test_normalize_strips_html_boilerplate_and_nfkc():
    t = normalize_text('<div><p>Ｆｕｌｌ&nbsp;width &amp; fine</p><script>x()</script><ul><li>a</li></ul></div> '
                       "Free shipping on orders over $50! Add to cart | Add to wishlist | Share\u200b")
    assert t == "Full width & fine\n- a", t


def test_near_duplicates_are_removed_but_distinct_texts_kept():
    base = " ".join(f"word{i}" for i in range(200))  # one word changed: Jaccard of 5-gram shingles ~0.95
    rows = [({"type": "general", "text": t, "_src": f"x:{i}"}, None) for i, t in enumerate(
        [base, base.replace("word30 ", "WORDX ") + " extra", " ".join(f"other{i}" for i in range(200))])]
    st = StageStats("c")
    kept = list(clean(iter(rows), CleanConfig(detect_missing_lang=False, min_chars=5), st))
    assert [k["_src"] for k in kept] == ["x:0", "x:2"] and st.rejected == Counter({"near_duplicate": 1})


def test_language_is_detected_when_absent(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"text": "Der Bürgermeister eröffnete gestern die neue Straßenbahnlinie zur Universität."})
                 + "\n" + json.dumps({"text": "Le maire a inauguré hier la nouvelle ligne de tramway vers l'université."})
                 + "\n")
    st = StageStats("c")
    kept = list(clean(R.iter_file(p, "general"), CleanConfig(), st))
    assert [k["lang"] for k in kept] == ["de", "fr"]


def test_parquet_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "g.parquet"
    pq.write_table(pa.table({"text": ["A perfectly fine general document about rivers.", None], "lang": ["en", "en"]}), p)
    got = list(R.iter_file(p, "general"))
    assert got[0][0]["text"].startswith("A perfectly") and got[0][0]["_src"] == f"{p}:1"
    assert got[1][1].reason == "missing_field"


def test_missing_path_and_empty_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        R.expand_paths([tmp_path / "nope.jsonl"])
    with pytest.raises(UserError, match="no .jsonl or .parquet"):
        R.expand_paths([tmp_path])


# ---------------------------------------------------------------------------------------------------- serialize


def test_graph_mix_invariants(clean_domain):
    graph = serialize(clean_domain, MixConfig(mix="graph"))
    sep = serialize(clean_domain, MixConfig(mix="separate"))
    by_src = {r["_src"]: r for r in clean_domain}
    used = [s for sample in graph for s in sample["records"]]
    assert len(used) == len(set(used)) == len(clean_domain)  # each node used exactly once
    for sample in graph:  # the records of a sample are connected through shared product ids
        recs = [by_src[s] for s in sample["records"]]
        reached = set(product_ids(recs[0]))
        todo = recs[1:]
        while todo:
            nxt = [r for r in todo if reached & set(product_ids(r))]
            assert nxt, f"sample with records not sharing product ids: {sample['records']}"
            for r in nxt:
                reached |= set(product_ids(r))
            todo = [r for r in todo if r not in nxt]
        assert len(sample["text"]) <= 4000 + 2 or len(recs) == 1
    mean = lambda xs: sum(len(x["sources"]) for x in xs) / len(xs)  # noqa: E731
    assert all(len(s["sources"]) >= 1 for s in graph)
    assert mean(graph) > mean(sep) == 1.0
    assert mean(graph) >= 1.8  # most clusters cover product + reviews (+ articles)
    again = serialize(clean_domain, MixConfig(mix="graph"))
    assert [s["text"] for s in again] == [s["text"] for s in graph]  # deterministic


def test_unknown_mix_is_user_error(clean_domain):
    with pytest.raises(UserError, match="graph, separate"):
        serialize(clean_domain[:3], MixConfig(mix="random"))


# ---------------------------------------------------------------------------------------------------- build (CLI)


def test_build_manifest_has_exactly_the_issue_keys(built):
    m = json.loads((built / "manifest.json").read_text())
    assert list(m) == ["blend", "sources", "realized", "rejected"]
    w, prefixes = m["blend"][0::2], m["blend"][1::2]
    assert abs(sum(w) - 1) < 1e-9 and all(x > 0 for x in w)
    assert prefixes == [s["prefix"] for s in m["sources"]]
    for s in m["sources"]:  # the mined source also says how it was mined (issue 11)
        extra = {"mined"} if s["prefix"] == "tokenized/domain_mined" else set()
        assert set(s) == {"prefix", "side", "lang", "documents", "tokens"} | extra, s
    assert {s["side"] for s in m["sources"]} == {"domain", "general"}
    assert set(m["realized"]) == {"general_to_domain_token_ratio", "non_english_share_of_general"}
    assert all(not Path(p).is_absolute() and (built / (p + ".bin")).is_file() for p in prefixes)


def test_blend_hits_targets_within_one_percent(built):
    m = json.loads((built / "manifest.json").read_text())
    assert abs(m["realized"]["general_to_domain_token_ratio"] - 1.0) <= 0.01
    assert abs(m["realized"]["non_english_share_of_general"] - 0.10) <= 0.01 * 0.10 + 1e-3
    # the same sources blended to other targets (the sweep 4:1 .. 1:4)
    for ratio, q in (("4:1", 0.1), ("1:4", 0.2), ("3:2", 0.05)):
        mm = make_manifest(m["sources"], ratio, q, {})
        target = parse_ratio(ratio)
        assert abs(mm["realized"]["general_to_domain_token_ratio"] / target - 1) <= 0.01, (ratio, mm["realized"])
        assert abs(mm["realized"]["non_english_share_of_general"] / q - 1) <= 0.01


def test_tokenized_datasets_read_back_with_manifest_counts(built, tok):
    from transformers import AutoTokenizer

    from ellama_recipes.data.indexed import read_back, read_document

    m = json.loads((built / "manifest.json").read_text())
    for s in m["sources"]:
        got = read_back(built / s["prefix"])
        assert (got["documents"], got["tokens"]) == (s["documents"], s["tokens"]), s["prefix"]
    t = AutoTokenizer.from_pretrained(tok)
    first = json.loads((built / "work/general_de.jsonl").read_text().splitlines()[0])["text"]
    doc = read_document(built / "tokenized/general_de", 0)
    assert doc[0] == t.bos_token_id and doc[-1] == t.eos_token_id
    assert list(doc[:-1]) == t(first)["input_ids"]  # bos + text, as HF encodes it; then eod


def test_accounting_and_rejects_file(built):
    report = json.loads((built / "report.json").read_text())
    for st in report["stages"]:
        assert st["records_in"] == st["records_out"] + sum(st["rejected"].values()), st
    m = json.loads((built / "manifest.json").read_text())
    lines = [json.loads(x) for p in sorted((built / "rejects").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert Counter(x["reason"] for x in lines) == Counter(m["rejected"])
    for kind in ("malformed_json", "missing_field", "wrong_type", "invalid_utf8", "empty_text", "exact_duplicate",
                 "near_duplicate"):
        assert m["rejected"].get(kind, 0) >= 1, kind
    assert any(x["source"] == f"{BAD_DOMAIN}:2" and x["reason"] == "malformed_json" for x in lines)


def test_classifier_report_and_mined_documents(built):
    report = json.loads((built / "report.json").read_text())
    c = report["classify"]
    h = c["classifier"]["held_out_domain_vs_general"]
    assert h["recall"] >= 0.95 and h["precision"] >= 0.85
    mined = [json.loads(x) for x in (built / "work/domain_mined.jsonl").read_text().splitlines()]
    assert c["budget"] == {"by": "threshold", "value": 0.5} and c["mined"] == len(mined)
    assert 20 <= len(mined) <= 200
    shop_words = ("store", "seller", "cart", "warranty", "reviews", "customer", "delivery", "listing", "ordered")
    hits = sum(any(w in d["text"].lower() for w in shop_words) for d in mined)
    assert hits / len(mined) >= 0.9
    assert all(d["p_domain"] >= 0.5 for d in mined) and min(d["score"] for d in mined) == c["min_mined_score"]
    assert sum(c["mined_per_language"].values()) == len(mined)
    assert (built / "mining_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((built / "manifest.json").read_text())
    (src,) = [s for s in m["sources"] if s["prefix"] == "tokenized/domain_mined"]
    assert src["side"] == "domain" and src["documents"] == len(mined)
    assert src["mined"]["mined_documents"] == len(mined) and src["mined"]["budget"] == c["budget"]


def test_rerun_failure_leaves_existing_output_intact(built, tok, tmp_path):
    from ellama_recipes.cli.main import main

    before = {p: p.stat().st_mtime_ns for p in built.rglob("*")}
    bad = tmp_path / "only_bad.jsonl"
    bad.write_bytes(b'{"text": 1}\n{oops\n')
    code = main(["data", "build", "--executor", "inprocess", "--domain", str(SAMPLE / "domain"), "--general", str(bad), "--tokenizer", str(tok),
                 "--out", str(built)])
    assert code == 2  # no valid general record
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*")} == before
    assert not [p for p in built.parent.iterdir() if p.name.startswith(f".{built.name}.")]


@pytest.mark.parametrize("args, msg", [
    (["--domain", "/nonexistent/x.jsonl"], "does not exist"),
    (["--tokenizer", "/nonexistent/tok"], "Tokenizer path"),
    (["--ratio", "2-1"], "GENERAL:DOMAIN"),
    (["--non-english", "1.5"], "non-english"),
    (["--mix", "zigzag"], "Unknown --mix"),
    (["--mine-fraction", "0.1", "--mine-tokens", "500"], "one mining budget"),
])
def test_build_bad_arguments_exit_2(cli, tok, tmp_path, args, msg):
    base = {"--domain": str(SAMPLE / "domain"), "--general": str(SAMPLE / "general"), "--tokenizer": str(tok),
            "--out": str(tmp_path / "o")}
    for k, v in zip(args[0::2], args[1::2]):
        base[k] = v
    argv = ["data", "build", "--executor", "inprocess", *[x for kv in base.items() for x in kv], "--dryrun"]
    r = cli(*argv)
    assert r.code == 2 and msg in r.err and "Traceback" not in r.err
    assert not (tmp_path / "o").exists()


def test_stage_commands_chain(cli, tok, tmp_path):
    """clean -> serialize -> classify -> tokenize (2 workers) -> blend, one subcommand each, on a slice."""
    dom = tmp_path / "dom"
    dom.mkdir()
    for name in ("products", "reviews", "articles"):
        lines = (SAMPLE / f"domain/{name}.jsonl").read_text().splitlines()[:150]
        (dom / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    gen = tmp_path / "gen"
    gen.mkdir()
    for lang in ("en", "de"):
        lines = (SAMPLE / f"general/general_{lang}.jsonl").read_text().splitlines()[:200]
        (gen / f"general_{lang}.jsonl").write_text("\n".join(lines) + "\n")
    w = tmp_path / "w"
    assert cli("data", "clean", "--executor", "inprocess", "--kind", "domain", "--input", dom, "--out", w / "cd").code == 0
    assert cli("data", "clean", "--executor", "inprocess", "--kind", "general", "--input", gen, "--out", w / "cg").code == 0
    assert cli("data", "serialize", "--input", w / "cd/clean.jsonl", "--out", w / "ser", "--mix", "graph").code == 0
    r = cli("data", "classify", "--executor", "inprocess", "--domain", w / "ser/domain.jsonl", "--general", w / "cg/clean.jsonl", "--out", w / "cls")
    assert r.code == 0 and "precision" in r.out
    d = w / "data"
    assert cli("data", "tokenize", "--executor", "inprocess", "--input", w / "ser/domain.jsonl", "--tokenizer", tok, "--out", d / "domain",
               "--side", "domain", "--workers", "2").code == 0
    for lang in ("en", "de"):
        assert cli("data", "tokenize", "--executor", "inprocess", "--input", w / f"cls/general_{lang}.jsonl", "--tokenizer", tok,
                   "--out", d / f"general_{lang}", "--side", "general", "--lang", lang).code == 0
    assert cli("data", "blend", d, "--ratio", "2:1", "--non-english", "0.2").code == 0
    m = json.loads((d / "manifest.json").read_text())
    assert abs(m["realized"]["general_to_domain_token_ratio"] - 2.0) <= 0.02
    assert abs(m["realized"]["non_english_share_of_general"] - 0.2) <= 0.002
    assert sorted(s["prefix"] for s in m["sources"]) == ["domain", "general_de", "general_en"]


def test_multiprocess_tokenize_is_identical_to_single(tok, tmp_path):
    from ellama_recipes.data.tokenize import load_tokenizer, tokenize_files

    info = load_tokenizer(tok)
    paths = [SAMPLE / "general/general_fr.jsonl", BAD_GENERAL]
    r1 = tokenize_files(paths, info, tmp_path / "w1", workers=1, chunk_docs=64)
    r2 = tokenize_files(paths, info, tmp_path / "w2", workers=2, chunk_docs=64)
    assert (r1.documents, r1.tokens, r1.rejected) == (r2.documents, r2.tokens, r2.rejected)
    assert r1.documents == 260 + 3 and sum(r1.rejected.values()) == 5  # tokenize does not dedup or check lang
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_writer_matches_megatron_stock_builder_bytes(tmp_path):
    import numpy as np

    from ellama_recipes.data.indexed import TokenWriter, write_with_stock_builder

    docs = [[1, 2, 3], [4], list(range(100, 140)), [7, 7]]
    write_with_stock_builder(tmp_path / "ref", docs, 4096)
    w = TokenWriter(tmp_path / "mine", 4096)
    w.add_batch(np.array(docs[0] + docs[1]), np.array([3, 1]))
    w.add_document(docs[2])
    w.add_document(docs[3])
    w.finalize()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mine{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_data_package_has_no_import_circles_and_imports_nothing_higher():
    """ellama_recipes.data modules import each other without cycles (imports inside functions included), and never
    import cli/, recipes/, recipe.py or engine/ at module level (data is the lowest layer; issue 8)."""
    import ast

    root = Path(R.__file__).parent
    mods = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for m in mods:
        tree = ast.parse((root / f"{m}.py").read_text())
        graph[m] = set()
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.startswith("ellama_recipes.data."):
                    graph[m].add(name.split(".")[2])
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(("ellama_recipes.cli", "ellama_recipes.engine", "ellama_recipes.config.schema")), \
                        f"data/{m}.py imports {name} at module level"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path + [m, n])
            if n in graph and n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "records" in graph["clean"] and "clean" not in graph["records"]  # the parse saw the imports


def test_every_data_command_help_has_an_example(cli):
    for cmd in ("build", "clean", "serialize", "classify", "tokenize", "blend", "train-tokenizer"):
        r = cli("data", cmd, "--help")
        assert r.code == 0 and "Example:" in r.out, cmd


def test_build_slurm_dryrun_prints_the_nemo_run_ray_job(cli, tok, tmp_path):
    """`--executor slurm --dryrun` with the training cluster.* keys: NeMo-Run's Slurm Ray job script (Ray head +
    workers, then the same build with --ray-address auto on the head node); nothing is written or submitted."""
    out = tmp_path / "o"
    r = cli("data", "build", "--domain", SAMPLE / "domain", "--general", SAMPLE / "general", "--tokenizer", tok,
            "--out", out, "--executor", "slurm", "--dryrun", "cluster.num_nodes=3", "cluster.slurm_account=acct",
            "cluster.slurm_partition=cpu", "cluster.slurm_time=01:30:00", "clean.min_chars=30")
    assert r.code == 0, r.err
    head, _, script = r.out.partition("\n}\n")
    plan = json.loads(head + "\n}")
    assert plan["executor"] == "slurm" and plan["command"].endswith("--executor ray --ray-address auto")
    assert "clean.min_chars=30" in plan["command"] and str(out) in plan["command"]
    for line in ("#SBATCH --nodes=3", "#SBATCH --account=acct", "#SBATCH --partition=cpu", "#SBATCH --time=01:30:00"):
        assert line in script, line
    assert "ray start --head" in script and 'ray start --address "$ip_head"' in script
    assert plan["command"] in script
    assert not out.exists() and not list(tmp_path.glob(".o*"))
    bad = cli("data", "build", "--domain", SAMPLE / "domain", "--general", SAMPLE / "general", "--tokenizer", tok,
              "--out", out, "--executor", "slurm", "--dryrun", "cluster.nodes=3")
    assert bad.code == 2 and "cluster.num_nodes" in bad.err
    bad = cli("data", "build", "--domain", SAMPLE / "domain", "--general", SAMPLE / "general", "--tokenizer", tok,
              "--out", out, "--dryrun", "cluster.num_nodes=3")
    assert bad.code == 2 and "--executor slurm" in bad.err
