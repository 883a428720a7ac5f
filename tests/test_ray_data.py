"""`ellama data build` on Ray Data (issue 19): equivalence with the in-process pipeline, a real 2-node Ray cluster on
this machine, resume after a kill, bad input.

Every Ray process runs inside ONE loopback-only network namespace (``unshare -n``, ``ip link set lo up``) with a
private HOME / temp dir: this file re-runs itself there (``python tests/test_ray_data.py --scenario ROOT TOK``), which
starts a Ray head and a second Ray node as separate ``ray start`` processes (1 CPU each, no dashboard), runs the
builds through the real CLI (``python -m ellama_recipes data build ...``) and stops the cluster; the tests read what
it left in ROOT/scenario.json. About 3-4 minutes on 2 busy cores (slow).

Builds (bundled sample + the bad-input files, blocks and shards of 0.25 MiB so each stage has several):
- ``two_node``: ``--ray-address 127.0.0.1:PORT`` against the 2-node cluster;
- ``resumed``: the same build killed (SIGKILL) once its first tokenized shard is finished, then run again;
- ``local``: no address (a local Ray instance started by the build, loopback), ``--workers 2``;
- ``ref``: ``--executor inprocess`` (the sequential pipeline, in this pytest process: no Ray).
"""

from __future__ import annotations

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
INPUTS = ["--domain", str(SAMPLE / "domain"), "--domain", str(SAMPLE / "bad/domain_bad.jsonl"),
          "--general", str(SAMPLE / "general"), "--general", str(SAMPLE / "bad/general_bad.jsonl")]
RAY_ARGS = ["--dedup", "local", "--block-mb", "0.25", "--shard-mb", "0.25"]
CLASSIFY_ARGS = ["--domain", str(SAMPLE / "domain"), "--general", str(SAMPLE / "general"), "--mine-fraction", "0.03"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ------------------------------------------------------------------------------------------------ the scenario
# (runs inside the network namespace; no pytest there)


def _ray(env, *args, check=True):
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, check=check, timeout=300)


def _build(env, out: Path, *extra: str, log: Path, inputs=INPUTS) -> int:
    cmd = [sys.executable, "-m", "ellama_recipes", "data", "build", *inputs, "--tokenizer", env["ELLAMA_TOK"],
           "--out", str(out), *extra]
    with open(log, "w") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode


def scenario(root: Path, tok: str) -> None:
    from ellama_recipes.data.ray_env import private_ray_env

    env = private_ray_env(root / "env", ELLAMA_TOK=tok)
    env.pop("ELLAMA_RAY_TMPDIR", None)
    res: dict = {"seconds": {}}
    port = 6391
    addr = f"127.0.0.1:{port}"
    t0 = time.perf_counter()
    _ray(env, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats")
    try:
        _ray(env, "start", f"--address={addr}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--disable-usage-stats")
        probe = subprocess.run([sys.executable, "-c", (
            "import json, ray, time\n"
            f"ray.init(address='{addr}', log_to_driver=False)\n"
            "for _ in range(60):\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            "    if len(nodes) == 2: break\n"
            "    time.sleep(1)\n"
            "print(json.dumps([[n['NodeID'], n['NodeManagerAddress'], n['Resources'].get('CPU')] for n in nodes]))")],
            env=env, capture_output=True, text=True, timeout=120)
        res["nodes"] = json.loads(probe.stdout.strip().splitlines()[-1])
        res["seconds"]["cluster_start"] = round(time.perf_counter() - t0, 1)

        t = time.perf_counter()
        res["rc_two_node"] = _build(env, root / "two_node", "--ray-address", addr, *RAY_ARGS, log=root / "two_node.log")
        res["seconds"]["two_node"] = round(time.perf_counter() - t, 1)

        # killed once its first shard is finished, then run again
        t = time.perf_counter()
        partial = root / ".resumed.partial"
        cmd = [sys.executable, "-m", "ellama_recipes", "data", "build", *INPUTS, "--tokenizer", tok, "--out",
               str(root / "resumed"), "--ray-address", addr, *RAY_ARGS]
        with open(root / "killed.log", "w") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
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
        res["rc_resumed"] = _build(env, root / "resumed", "--ray-address", addr, *RAY_ARGS, log=root / "resumed.log")
        after = {str(p).replace(str(root / "resumed"), str(partial)): p.stat().st_mtime_ns
                 for p in (root / "resumed").glob("tokenized/*/*.shard.json")}
        res["rewritten_after_resume"] = sorted(k for k, v in finished.items() if after.get(k) != v)
        res["seconds"]["killed_and_resumed"] = round(time.perf_counter() - t, 1)

        # mining alone: `ellama data classify` scored by the cluster's actor pool
        t = time.perf_counter()
        res["rc_classify"] = subprocess.run(
            [sys.executable, "-m", "ellama_recipes", "data", "classify", *CLASSIFY_ARGS, "--out",
             str(root / "classify_ray"), "--ray-address", addr], env=env, capture_output=True, timeout=600).returncode
        res["seconds"]["classify"] = round(time.perf_counter() - t, 1)

        # a corpus that leaves nothing valid
        bad = root / "only_bad.jsonl"  # not one valid line: malformed JSON, a non-object, a wrong type, a blank
        bad.write_bytes(b'{"type": "product", "id": \n[1, 2]\n{"type": "review", "product_id": "p", "rating": "5",'
                        b' "text": "x"}\n\n')
        res["rc_bad"] = _build(env, root / "bad", "--ray-address", addr, *RAY_ARGS, log=root / "bad.log",
                               inputs=["--domain", str(bad), "--general", str(SAMPLE / "general")])
    finally:
        _ray(env, "stop", "--force", check=False)
    t = time.perf_counter()
    res["rc_local"] = _build(env, root / "local", "--workers", "2", *RAY_ARGS, log=root / "local.log")
    res["seconds"]["local"] = round(time.perf_counter() - t, 1)
    (root / "scenario.json").write_text(json.dumps(res, indent=1))


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer

    return train_tokenizer(sample_texts(), tmp_path_factory.mktemp("tok"), vocab_size=4096)


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory):
    """The scenario's outputs (in the namespace) and the in-process reference build."""
    import shutil
    import tempfile

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a loopback-only network namespace (the Ray network rule)")
    root = Path(tempfile.mkdtemp(prefix="e19-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    try:
        # its own network namespace (loopback only) AND pid namespace: `ray stop` in there sees only this
        # scenario's Ray processes, and the kernel ends every one of them when the scenario exits
        cmd = ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c",
               "ip link set lo up && exec " + shlex.join([sys.executable, __file__, "--scenario", str(root), str(tok)])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        res = json.loads((root / "scenario.json").read_text())
        from ellama_recipes.data.pipeline import build

        t = time.perf_counter()
        bad_d, bad_g = SAMPLE / "bad/domain_bad.jsonl", SAMPLE / "bad/general_bad.jsonl"
        build([SAMPLE / "domain", bad_d], [SAMPLE / "general", bad_g], tok, root / "ref", progress=False,
              executor="inprocess")
        res["seconds"]["ref_inprocess"] = round(time.perf_counter() - t, 1)
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
    assert res["rc_two_node"] == 0, (root / "two_node.log").read_text()[-3000:]
    ex = _report(root / "two_node")["executor"]
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
    _same_outputs(root / "two_node", root / "local")


def test_killed_build_resumes_without_redoing_finished_work(runs):
    root, res = runs
    assert res["killed_rc"] == -signal.SIGKILL
    assert res["finished_before_resume"], "the build was killed before any shard finished"
    assert {"clean_domain", "clean_general", "classify"} <= set(res["stages_before_resume"])
    assert res["rc_resumed"] == 0, (root / "resumed.log").read_text()[-3000:]
    assert _report(root / "resumed")["executor"]["resumed"] is True
    assert res["rewritten_after_resume"] == []  # finished shards were not redone
    assert not (root / ".resumed.partial").exists()
    _same_outputs(root / "resumed", root / "two_node")
    # no half-written shard is listed: every listed prefix has its .bin/.idx and its counts match the index
    from ellama_recipes.data.indexed import read_back

    m = json.loads((root / "resumed" / "manifest.json").read_text())
    for s in m["sources"]:
        rb = read_back(root / "resumed" / s["prefix"])
        assert (rb["documents"], rb["tokens"]) == (s["documents"], s["tokens"])
    assert not list((root / "resumed").rglob(".*tmp*"))


def test_mining_on_ray_selects_the_same_documents(runs, cli, tmp_path):
    """`ellama data classify --mine-fraction F`: the classifier fitted on the same sample, the corpus scored by the
    cluster's actors (ScoreBlock, several blocks: the corpus is 4 files), the same documents mined and kept."""
    root, res = runs
    assert res["rc_classify"] == 0
    r = cli("data", "classify", *CLASSIFY_ARGS, "--out", tmp_path / "ref", "--executor", "inprocess")
    assert r.code == 0, r.err
    ray_out, ref = root / "classify_ray", tmp_path / "ref"
    assert (ray_out / "mined.jsonl").read_bytes() == (ref / "mined.jsonl").read_bytes()
    assert (ray_out / "mined.jsonl").read_text().count("\n") > 0
    names = sorted(p.name for p in ref.glob("general_*.jsonl"))
    assert names == sorted(p.name for p in ray_out.glob("general_*.jsonl")) and names
    for n in names:
        assert (ray_out / n).read_bytes() == (ref / n).read_bytes()
    a, b = (json.loads((x / "report.json").read_text()) for x in (ray_out, ref))
    for k in ("mined", "kept", "min_mined_score", "score_quantiles_general", "accounting"):
        assert a[k] == b[k], k


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
