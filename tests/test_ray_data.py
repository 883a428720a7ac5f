"""`ellama data build` on Ray Data (issue 19): equivalence with the in-process pipeline, a real 2-node Ray cluster on
this machine, resume after a kill, the distributed dedup on both nodes, bad input.

Every Ray process runs inside ONE loopback-only network + pid namespace (``unshare -n -p``, ``ip link set lo up``)
with a private HOME / temp dir: this file re-runs itself there (``python tests/test_ray_data.py --scenario ROOT
TOK``), which starts a Ray head and a second Ray node as separate ``ray start`` processes (1 CPU each, no
dashboard), connects to them ONCE (the scenario process is the driver of every cluster check but the killed build)
and stops the cluster; the tests read what it left in ROOT/scenario.json. While it runs, this pytest process builds
the in-process references (no Ray). About 110 s on 2 shared cores (slow).

Corpus: the first 40 % of every bundled sample file (about 1.2 MB) plus the bad-input files; blocks and shards of
0.1 MiB so each stage has several. Runs, in this order:
- ``dedup``: :func:`ellama_recipes.data.dedup.find_duplicates` on the cluster (tests/test_dedup.py's planted corpus
  + a chain + an exact copy; lazy input, other block / partition counts and order, a tiny input);
- ``resumed``: ``data build --ray-address 127.0.0.1:PORT`` killed (SIGKILL, its own process) once its first
  tokenized shard is finished, then run again through the CLI entry point in the scenario process: this is also the
  2-node build (its report's rows per node cover both runs);
- ``classify_ray``: ``data classify --ray-address`` (mining scored on the cluster);
- ``bad``: a build whose domain side has no valid line (exit 2);
- ``local``: no address (a local Ray instance started by the build, loopback), ``--workers 2``, its own process,
  after the cluster is stopped;
- ``ref`` / ``classify_ref``: ``--executor inprocess`` (the sequential pipeline, in this pytest process).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "ellama_recipes" / "sample_data"
FRACTION = 0.4  # of every sample file's lines in the test corpus
RAY_ARGS = ["--dedup", "local", "--block-mb", "0.1", "--shard-mb", "0.1"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def make_corpus(root: Path) -> Path:
    """ROOT/corpus/{domain,general}/*.jsonl (the first FRACTION of each sample file) and corpus/bad/ (as bundled)."""
    c = root / "corpus"
    for side in ("domain", "general", "bad"):
        (c / side).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / side).glob("*.jsonl")):
            lines = f.read_bytes().splitlines(keepends=True)
            (c / side / f.name).write_bytes(b"".join(lines if side == "bad" else lines[:int(len(lines) * FRACTION)]))
    return c


def inputs(c: Path) -> list[str]:
    return ["--domain", str(c / "domain"), "--domain", str(c / "bad/domain_bad.jsonl"),
            "--general", str(c / "general"), "--general", str(c / "bad/general_bad.jsonl")]


def classify_args(c: Path) -> list[str]:
    return ["--domain", str(c / "domain"), "--general", str(c / "general"), "--mine-fraction", "0.03"]


# ------------------------------------------------------------------------------------------------ the scenario
# (runs inside the network namespace; no pytest there)


def _ray(env, *args, check=True):
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, check=check, timeout=300)


def _cli_here(argv: list[str], log: Path) -> int:
    """``ellama ARGV`` through the CLI entry point in this (connected) process, output to ``log``."""
    from ellama_recipes.cli.main import main

    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return main([str(a) for a in argv])


def _dedup_on_cluster(root: Path) -> dict:
    import ray.data

    from ellama_recipes.data.dedup import find_duplicates
    from test_dedup import ray_case_rows

    rows = ray_case_rows()
    lazy = ray.data.from_items(rows, override_num_blocks=3).map_batches(lambda b: b)  # not materialized
    out = find_duplicates(lazy).take_all()
    # other blocks and partitions, reversed order: the same drops
    other = find_duplicates(ray.data.from_items(rows[::-1], override_num_blocks=5), num_partitions=3).take_all()
    few = find_duplicates(ray.data.from_items(rows[:5], override_num_blocks=2))
    plain = lambda ds: [{k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()} for d in ds]  # noqa: E731
    return {"out": plain(out), "other": plain(other), "few_schema": few.schema().names, "few": few.count()}


def scenario(root: Path, tok: str) -> None:
    from ellama_recipes.data.ray_env import private_ray_env

    env = private_ray_env(root / "env", ELLAMA_TOK=tok)
    env.pop("ELLAMA_RAY_TMPDIR", None)
    os.environ.clear()
    os.environ.update(env)  # this process is a driver too
    c = root / "corpus"
    res: dict = {"seconds": {}}
    port = 6391
    addr = f"127.0.0.1:{port}"
    t0 = time.perf_counter()
    _ray(env, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats")
    try:
        _ray(env, "start", f"--address={addr}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--disable-usage-stats")
        import ray
        import ray.data

        ray.init(address=addr, log_to_driver=False)
        for _ in range(60):
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if len(nodes) == 2:
                break
            time.sleep(0.5)
        res["nodes"] = [[n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU")] for n in nodes]
        res["driver_ip"] = ray.util.get_node_ip_address()
        ray.data.DataContext.get_current().enable_progress_bars = False
        res["seconds"]["cluster_start"] = round(time.perf_counter() - t0, 1)

        t = time.perf_counter()
        res["dedup"] = _dedup_on_cluster(root)
        res["seconds"]["dedup"] = round(time.perf_counter() - t, 1)

        # killed once its first shard is finished (its own process), then run again: the 2-node build
        t = time.perf_counter()
        partial = root / ".resumed.partial"
        build = ["data", "build", *inputs(c), "--tokenizer", tok, "--out", str(root / "resumed"),
                 "--ray-address", addr, *RAY_ARGS]
        with open(root / "killed.log", "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "ellama_recipes", *build], env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            done: list[Path] = []
            while proc.poll() is None and not done:
                done = sorted(partial.glob("tokenized/*/*.shard.json"))
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        res["killed_rc"] = proc.returncode
        finished = {str(p): p.stat().st_mtime_ns for p in partial.glob("tokenized/*/*.shard.json")}
        res["stages_before_resume"] = sorted(p.stem for p in partial.glob("work/stages/*.json"))
        res["finished_before_resume"] = finished
        res["seconds"]["killed"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        res["rc_resumed"] = _cli_here(build, root / "resumed.log")
        after = {str(p).replace(str(root / "resumed"), str(partial)): p.stat().st_mtime_ns
                 for p in (root / "resumed").glob("tokenized/*/*.shard.json")}
        res["rewritten_after_resume"] = sorted(k for k, v in finished.items() if after.get(k) != v)
        res["seconds"]["resumed"] = round(time.perf_counter() - t, 1)

        # mining alone: `ellama data classify` scored on the cluster
        t = time.perf_counter()
        res["rc_classify"] = _cli_here(["data", "classify", *classify_args(c), "--out", root / "classify_ray",
                                        "--ray-address", addr], root / "classify.log")
        res["seconds"]["classify"] = round(time.perf_counter() - t, 1)

        # a corpus that leaves nothing valid
        bad = root / "only_bad.jsonl"  # not one valid line: malformed JSON, a non-object, a wrong type, a blank
        bad.write_bytes(b'{"type": "product", "id": \n[1, 2]\n{"type": "review", "product_id": "p", "rating": "5",'
                        b' "text": "x"}\n\n')
        res["rc_bad"] = _cli_here(["data", "build", "--domain", bad, "--general", c / "general", "--tokenizer", tok,
                                   "--out", root / "bad", "--ray-address", addr, *RAY_ARGS], root / "bad.log")
        ray.shutdown()
    finally:
        _ray(env, "stop", "--force", check=False)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "ellama_recipes", "data", "build", *inputs(c), "--tokenizer", tok, "--out",
           str(root / "local"), "--workers", "2", *RAY_ARGS]
    with open(root / "local.log", "w") as f:
        res["rc_local"] = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    res["seconds"]["local"] = round(time.perf_counter() - t, 1)
    (root / "scenario.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(), tmp_path_factory.mktemp("tok"), vocab_size=4096)


@pytest.fixture(scope="module")
def runs(tok):
    """The scenario's outputs (in the namespace) and, built meanwhile in this process, the in-process references."""
    import shutil
    import tempfile

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a loopback-only network namespace (the Ray network rule)")
    root = Path(tempfile.mkdtemp(prefix="e19-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    try:
        c = make_corpus(root)
        # its own network namespace (loopback only) AND pid namespace: `ray stop` in there sees only this
        # scenario's Ray processes, and the kernel ends every one of them when the scenario exits
        cmd = ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c",
               "ip link set lo up && exec " + shlex.join([sys.executable, __file__, "--scenario", str(root), str(tok)])]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            from ellama_recipes.cli.main import main
            from ellama_recipes.data.pipeline import build

            t = time.perf_counter()
            bad_d, bad_g = c / "bad/domain_bad.jsonl", c / "bad/general_bad.jsonl"
            build([c / "domain", bad_d], [c / "general", bad_g], tok, root / "ref", progress=False,
                  executor="inprocess")
            ref_s = round(time.perf_counter() - t, 1)
            with open(root / "classify_ref.log", "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                rc_ref = main(["data", "classify", *classify_args(c), "--out", str(root / "classify_ref"),
                               "--executor", "inprocess"])
            out, _ = proc.communicate(timeout=1500)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-6000:]
        res = json.loads((root / "scenario.json").read_text())
        res["rc_classify_ref"] = rc_ref
        res["seconds"]["ref_inprocess (meanwhile)"] = ref_s
        res["seconds"]["all"] = round(time.perf_counter() - t0, 1)
        print("scenario seconds:", res["seconds"])
        yield root, res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------------------------ tests


def test_two_nodes_on_loopback_and_work_on_both(runs):
    root, res = runs
    assert len(res["nodes"]) == 2 and all(addr == "127.0.0.1" for _, addr, _ in res["nodes"]), res["nodes"]
    assert res["driver_ip"] == "127.0.0.1"
    assert res["rc_resumed"] == 0, (root / "resumed.log").read_text()[-3000:]
    ex = _report(root / "resumed")["executor"]
    assert ex["node_addresses"] == ["127.0.0.1"] and ex["cpus"] == 2
    ids = {nid for nid, _, _ in res["nodes"]}
    for stage in ("clean_domain", "clean_general", "tokenize"):
        assert set(ex["rows_per_node"][stage]) == ids, (stage, ex["rows_per_node"][stage])  # work on both nodes


def _same_outputs(a: Path, b: Path) -> None:
    from ellama_recipes.data.compare import compare_builds

    d = compare_builds(a, b)
    assert all(not v for v in d["rejects"].values()), d["rejects"]
    assert all(d["kept_equal"].values()) and not d["sources"] and all(d["tokens_equal"].values()), d
    assert json.loads((a / "manifest.json").read_text())["blend"] == json.loads((b / "manifest.json").read_text())["blend"]
    ra, rb = _report(a), _report(b)
    assert ra["stages"] == rb["stages"]
    assert ra.get("classify", {}).get("mined") == rb.get("classify", {}).get("mined")


def test_two_node_build_equals_the_local_build(runs):
    root, res = runs
    assert res["rc_local"] == 0, (root / "local.log").read_text()[-3000:]
    assert _report(root / "local")["executor"]["node_addresses"] == ["127.0.0.1"]
    _same_outputs(root / "resumed", root / "local")


def test_killed_build_resumes_without_redoing_finished_work(runs):
    root, res = runs
    assert res["killed_rc"] == -signal.SIGKILL
    assert res["finished_before_resume"], "the build was killed before any shard finished"
    assert {"clean_domain", "clean_general", "classify"} <= set(res["stages_before_resume"])
    assert res["rc_resumed"] == 0, (root / "resumed.log").read_text()[-3000:]
    assert _report(root / "resumed")["executor"]["resumed"] is True
    assert res["rewritten_after_resume"] == []  # finished shards were not redone
    assert not (root / ".resumed.partial").exists()
    # equal to an uninterrupted build (the local one; the 2-node == local check above is the same comparison)
    _same_outputs(root / "resumed", root / "local")
    # no half-written shard is listed: every listed prefix has its .bin/.idx and its counts match the index
    from ellama_recipes.data.indexed import read_back

    m = json.loads((root / "resumed" / "manifest.json").read_text())
    for s in m["sources"]:
        rb = read_back(root / "resumed" / s["prefix"])
        assert (rb["documents"], rb["tokens"]) == (s["documents"], s["tokens"])
    assert not list((root / "resumed").rglob(".*tmp*"))


def test_mining_on_ray_selects_the_same_documents(runs):
    """`ellama data classify --mine-fraction F`: the classifier fitted on the same sample, the corpus scored on the
    cluster (ScoreBlock, several blocks: the corpus is 4 files), the same documents mined and kept."""
    root, res = runs
    assert res["rc_classify"] == 0, (root / "classify.log").read_text()[-3000:]
    assert res["rc_classify_ref"] == 0, (root / "classify_ref.log").read_text()[-3000:]
    ray_out, ref = root / "classify_ray", root / "classify_ref"
    assert (ray_out / "mined.jsonl").read_bytes() == (ref / "mined.jsonl").read_bytes()
    assert (ray_out / "mined.jsonl").read_text().count("\n") > 0
    names = sorted(p.name for p in ref.glob("general_*.jsonl"))
    assert names == sorted(p.name for p in ray_out.glob("general_*.jsonl")) and names
    for n in names:
        assert (ray_out / n).read_bytes() == (ref / n).read_bytes()
    a, b = (json.loads((x / "report.json").read_text()) for x in (ray_out, ref))
    for k in ("mined", "kept", "min_mined_score", "score_quantiles_general", "accounting"):
        assert a[k] == b[k], k


def _dedup_key(d):
    return (int(d["id"]), int(d["rep_id"]), d["reason"], round(float(d["jaccard"]), 9), d["rep_where"])


def test_ray_dedup_on_two_nodes_equals_local(runs):
    """:func:`ellama_recipes.data.dedup.find_duplicates` on the 2-node cluster (shuffles across both nodes) drops
    exactly what :func:`~ellama_recipes.data.dedup.find_duplicates_local` drops, for a lazy input, for other block /
    partition counts in reverse order, and returns the documented schema (empty result included)."""
    from ellama_recipes.data.dedup import DedupConfig, find_duplicates_local
    from test_dedup import ray_case_rows

    _, res = runs
    data = ray_case_rows()
    local = find_duplicates_local(data, DedupConfig())
    d = res["dedup"]
    assert sorted(map(_dedup_key, d["out"])) == sorted(map(_dedup_key, local))
    assert sorted(map(_dedup_key, d["other"])) == sorted(map(_dedup_key, local))
    assert {(x["id"], x["rep_id"]) for x in local} >= {(10_001, 10_000), (20_000, 10_000)}
    assert 10_002 not in {x["id"] for x in local}  # the chain's far end is kept
    assert d["few_schema"] == ["id", "rep_id", "reason", "jaccard", "rep_where"]
    assert d["few"] == len(find_duplicates_local(data[:5], DedupConfig()))


def test_nothing_valid_exits_2_with_the_reason(runs):
    root, res = runs
    # a domain file without one valid line: every line rejected with its reason and file:line, then exit 2
    log = (root / "bad.log").read_text()
    assert res["rc_bad"] == 2 and "No valid domain record" in log and "Traceback" not in log, log[-2000:]
    assert "all 4 lines were rejected" in log and "malformed_json" in log and "not_an_object" in log, log[-2000:]
    rejects = [json.loads(x) for x in (root / ".bad.partial/rejects/clean_domain.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[1] for r in rejects] == ["1", "2", "3", "4"]
    assert [r["reason"] for r in rejects] == ["malformed_json", "not_an_object", "wrong_type", "blank_line"]


def test_ray_build_equals_inprocess_except_justified_near_duplicates(runs):
    """Kept documents, rejects (reason + file:line), token streams per source, blend: equal to the in-process
    pipeline's, except near-duplicate decisions. Each such difference is checked on the exact word 5-shingle
    Jaccard: a document only Ray drops has a kept document with Jaccard >= threshold (the pair it names); a document
    only the in-process MinHash-LSH drops has no kept document with Jaccard >= threshold (an LSH estimate's false
    positive)."""
    from ellama_recipes.data.compare import compare_builds, text_at
    from ellama_recipes.data.dedup import jaccard, shingle_set

    root, _ = runs
    ray_out, ref = root / "local", root / "ref"
    d = compare_builds(ray_out, ref)
    assert d["rejects"]["tokenize"] == []
    changed_langs = set()
    for stage, kind in (("clean_domain", "domain"), ("clean_general", "general")):
        kept = [json.loads(x) for x in (ray_out / "work" / f"clean_{kind}.jsonl").read_text().splitlines()]
        ray_rej = {r["source"]: r for r in map(json.loads, (ray_out / "rejects" / f"{stage}.jsonl").open())}
        kept_sets = None
        for where, ray_reason, ref_reason in d["rejects"][stage]:
            assert "near_duplicate" in (ray_reason, ref_reason) and {ray_reason, ref_reason} <= {"near_duplicate", None}, \
                (where, ray_reason, ref_reason)
            me = shingle_set(text_at(where, kind))
            if ray_reason == "near_duplicate":  # dropped by Ray only: the pair it names is >= threshold
                rep = ray_rej[where]["detail"].rsplit(" with ", 1)[1]
                assert jaccard(me, shingle_set(text_at(rep, kind))) >= 0.8, (where, rep)
            else:  # dropped by the old LSH only: nothing Ray kept is >= threshold
                if kept_sets is None:
                    from ellama_recipes.data.records import TEXT_FIELD, render

                    kept_sets = [shingle_set(render(r) if r["type"] == "product" else r[TEXT_FIELD[r["type"]]])
                                 for r in kept]
                best = max(jaccard(me, k) for k in kept_sets if k != me) if kept_sets else 0.0
                assert best < 0.8, (where, best)
            if kind == "general":
                changed_langs.add(json.loads(Path(where.rpartition(":")[0]).read_text().splitlines()
                                             [int(where.rpartition(":")[2]) - 1]).get("lang"))
    # downstream: a source differs only if a near-duplicate decision fed into it
    affected = {n for n in set(d["tokens_equal"]) if n.startswith("domain_")} if any(
        d["rejects"][s] for s in ("clean_domain", "clean_general")) else set()
    affected |= {f"general_{lang}" for lang in changed_langs}
    for name, equal in d["tokens_equal"].items():
        assert equal or name in affected, (name, d["sources"].get(name))
    assert set(d["sources"]) <= affected, d["sources"]
    assert d["realized"][0] == d["realized"][1]
    ra, rb = d["rejected"]
    assert {k: v for k, v in ra.items() if k != "near_duplicate"} == {k: v for k, v in rb.items() if k != "near_duplicate"}
    # accounting: in = out + rejected at every stage, summed over blocks and shards
    for st in _report(ray_out)["stages"]:
        assert st["records_in"] == st["records_out"] + sum(st["rejected"].values()), st


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--scenario":
    scenario(Path(sys.argv[2]), sys.argv[3])
