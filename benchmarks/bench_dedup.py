"""Near-duplicate detection quality: the old cleaner's ``NearDup`` (datasketch ``MinHashLSH``, 64 permutations,
threshold 0.8, bands chosen at the threshold, no verification) vs ``ellama_recipes.data.dedup`` (16 x 4 LSH bands
tuned below the threshold + exact Jaccard of every candidate + label-propagation clusters), on generated corpora
with planted near-duplicates, against a brute-force exact Jaccard reference.

    .venv/bin/python benchmarks/bench_dedup.py                        # quality table, in-process (~1 min)
    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_dedup.py --ray --scale10
                                       # + the same through Ray Data (2 CPUs, loopback netns) at 1x and 10x, with
                                       #   peak RSS of the driver and of the Ray worker processes

Metrics (over the brute-force reference pairs, i.e. every pair sharing a shingle, exact word 5-shingle Jaccard):
- recall: pairs with Jaccard >= 0.8 where at least one of the two documents is dropped (target >= 95 %);
- false removal: pairs with Jaccard <= 0.7 where one document is dropped although it has no document with
  Jaccard >= 0.8 that is kept -- the removal is explained by no true near-duplicate (target <= 2 %);
- unjustified drops: dropped documents with no kept document at Jaccard >= 0.8 (exact duplicates count as 1.0).
Both methods run exact dedup first (the cleaner does too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ellama_recipes.data.clean import _dedup_key, _shingles  # noqa: E402
from ellama_recipes.data.dedup import DedupConfig, find_duplicates_local, jaccard, shingle_set  # noqa: E402
from ellama_recipes.data.planted_dups import planted_corpus, reference_pairs  # noqa: E402


class OldNearDup:
    """data/clean.py's NearDup before issue 19, verbatim: one in-process datasketch MinHashLSH index."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self.num_perm = num_perm
        self.seed = seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._n = 0
        self._proto = MinHash(num_perm=num_perm, seed=seed)
        self._kw = {"permutations": self._proto.permutations}
        if hasattr(self._proto, "scheme"):
            self._kw["scheme"] = self._proto.scheme

    def seen(self, text: str) -> bool:
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed, **self._kw)
        m.update_batch(_shingles(text))
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self._n), m, check_duplication=False)
        self._n += 1
        return False


def old_neardup(rows: list[dict], nd_class=None) -> list[dict]:
    """The sequential cleaner's decisions: exact key, then ``seen()`` in id order (old NearDup by default)."""
    nd = (nd_class or OldNearDup)(0.8, 64)
    seen: dict[bytes, int] = {}
    drops = []
    for r in sorted(rows, key=lambda r: r["id"]):
        k = _dedup_key(r["text"])
        if k in seen:
            drops.append({"id": r["id"], "reason": "exact_duplicate"})
            continue
        seen[k] = r["id"]
        if nd.seen(r["text"]):
            drops.append({"id": r["id"], "reason": "near_duplicate"})
    return drops


def score(rows: list[dict], ref: dict, drops: list[dict], threshold: float = 0.8, low: float = 0.7) -> dict:
    dropped = {d["id"] for d in drops}
    exact_dropped = {d["id"] for d in drops if d["reason"] == "exact_duplicate"}
    kept = {r["id"] for r in rows} - dropped
    justified = set(exact_dropped)
    for (a, b), j in ref.items():
        if j >= threshold:
            if a in dropped and b in kept:
                justified.add(a)
            if b in dropped and a in kept:
                justified.add(b)
    unjust = dropped - justified
    hi = [p for p, j in ref.items() if j >= threshold]
    lo = [p for p, j in ref.items() if j <= low]
    caught = sum(1 for a, b in hi if a in dropped or b in dropped)
    false = sum(1 for a, b in lo if a in unjust or b in unjust)
    both_kept = sum(1 for a, b in hi if a in kept and b in kept)
    near_t = [p for p, j in ref.items() if threshold <= j < threshold + 0.05]
    caught_t = sum(1 for a, b in near_t if a in dropped or b in dropped)
    return {"pairs_ge": len(hi), "recall": caught / max(1, len(hi)), "pairs_le": len(lo),
            "pairs_near_t": len(near_t), "recall_near_t": caught_t / max(1, len(near_t)),
            "false_removal": false / max(1, len(lo)), "dropped": len(dropped), "unjustified": len(unjust),
            "dup_pairs_both_kept": both_kept}


def corpus_stats(ref: dict) -> str:
    hi = sorted(j for j in ref.values() if 0.8 <= j < 1.0)
    mid = hi[len(hi) // 2] if hi else float("nan")
    return (f"pairs >= 0.8: {sum(1 for j in ref.values() if j >= 0.8)} (median of those < 1: {mid:.2f}), "
            f"0.7-0.8: {sum(1 for j in ref.values() if 0.7 < j < 0.8)}, <= 0.7: "
            f"{sum(1 for j in ref.values() if j <= 0.7)}")


def _ray_child(corpus_path: str, out_path: str) -> None:
    """Runs inside the loopback namespace: find_duplicates on Ray (2 CPUs), writes drops + memory to out_path."""
    import threading

    import psutil
    import ray

    from ellama_recipes.data.dedup import find_duplicates
    from ellama_recipes.data.ray_env import init_ray, node_addresses

    init_ray(num_cpus=2)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    assert node_addresses() == ["127.0.0.1"], node_addresses()
    peak = {"workers": 0, "driver": 0}
    stop = threading.Event()
    me = psutil.Process()

    def sample():
        while not stop.is_set():
            try:
                kids = [p for p in psutil.process_iter(["cmdline"]) if "ray::" in " ".join(p.info["cmdline"] or [])]
                # USS: memory private to the process (RSS also counts the shared object-store pages it touched)
                peak["workers"] = max([peak["workers"], *[p.memory_full_info().uss for p in kids]])
                peak["driver"] = max(peak["driver"], me.memory_full_info().uss)
            except (psutil.Error, OSError):
                pass
            stop.wait(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    n_rows = sum(1 for _ in open(corpus_path))
    ds = ray.data.read_json(corpus_path, override_num_blocks=max(4, n_rows // 2000))  # the driver never holds it
    # partitions sized by documents (1,000 per partition here, 50,000 by default) so that per-task memory is the
    # same at 1x and 10x
    drops = find_duplicates(ds, DedupConfig(), docs_per_partition=1000).take_all()
    wall = time.time() - t0
    stop.set()
    th.join()
    ray.shutdown()
    Path(out_path).write_text(json.dumps({"drops": [{k: (int(v) if k in ("id", "rep_id") else
                                                         float(v) if k == "jaccard" else v)
                                                     for k, v in d.items()} for d in drops],
                                          "wall_s": wall, "peak_worker_rss": peak["workers"],
                                          "peak_driver_rss": peak["driver"]}))


def _old_child(corpus_path: str, out_path: str) -> None:
    """A fresh process running the old in-process NearDup over the corpus: its peak RSS and time."""
    import psutil

    me = psutil.Process()
    nd, seen = OldNearDup(0.8, 64), set()
    nd.seen("warm up the imports " * 10)
    base = me.memory_full_info().uss
    t = time.time()
    with open(corpus_path) as f:  # streamed, in id order, as the cleaner does: what grows is the index
        for line in f:
            r = json.loads(line)
            k = _dedup_key(r["text"])
            if k not in seen:
                seen.add(k)
                nd.seen(r["text"])
    Path(out_path).write_text(json.dumps({"wall_s": time.time() - t, "peak_rss": me.memory_full_info().uss,
                                          "rss_before": base}))


def _write(rows: list[dict], tmp: Path, name: str) -> Path:
    cp = tmp / f"{name}.jsonl"
    with open(cp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return cp


def run_ray(rows: list[dict], tmp: Path, name: str = "corpus") -> dict:
    from ellama_recipes.data.ray_env import private_ray_env, python_in_netns, short_tmp_root

    root = short_tmp_root()
    cp, op = _write(rows, tmp, name), tmp / f"{name}_ray.json"
    cmd = python_in_netns([str(Path(__file__).resolve()), "--_ray-child", str(cp), str(op)])
    try:
        subprocess.run(cmd, check=True, env=private_ray_env(root, PYTHONPATH=str(ROOT)), timeout=3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return json.loads(op.read_text())


def run_old(rows: list[dict], tmp: Path, name: str = "corpus") -> dict:
    cp, op = _write(rows, tmp, name), tmp / f"{name}_old.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_old-child", str(cp), str(op)], check=True,
                   timeout=3600)
    return json.loads(op.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-base", type=int, default=1500, help="base documents of the 1x corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray", action="store_true", help="also run find_duplicates on Ray Data (loopback netns)")
    ap.add_argument("--scale10", action="store_true", help="with --ray: also a 10x corpus (memory side by side)")
    ap.add_argument("--_ray-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_old-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._ray_child:
        _ray_child(*a._ray_child)
        return
    if a._old_child:
        _old_child(*a._old_child)
        return
    import tempfile

    rows = planted_corpus(n_base=a.n_base, seed=a.seed, n_templates=max(6, a.n_base // 100))
    t = time.time()
    ref = reference_pairs(rows)
    print(f"corpus: {len(rows)} documents; brute-force reference over all pairs sharing a shingle "
          f"({time.time() - t:.1f} s): {corpus_stats(ref)}")
    results = []
    t = time.time()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = old_neardup(rows)
    results.append(("old NearDup (datasketch MinHashLSH 64 perm, threshold 0.8)", score(rows, ref, old),
                    time.time() - t))
    t = time.time()
    from ellama_recipes.data.clean import NearDup

    results.append(("new clean.NearDup (in-process streaming cleaner: same LSH + exact Jaccard)",
                    score(rows, ref, old_neardup(rows, NearDup)), time.time() - t))
    t = time.time()
    new = find_duplicates_local(rows, DedupConfig())
    results.append(("new dedup.find_duplicates_local (16x4 bands + exact Jaccard + clusters)",
                    score(rows, ref, new), time.time() - t))
    cfg = DedupConfig()
    print(f"new LSH: {cfg.bands} bands x {cfg.rows} rows; P(candidate) at Jaccard 0.5/0.7/0.75/0.8: "
          + " / ".join(f"{cfg.candidate_probability(s):.4f}" for s in (0.5, 0.7, 0.75, 0.8)))
    ray_runs = []
    if a.ray:
        with tempfile.TemporaryDirectory() as td:
            r = run_ray(rows, Path(td))
            ray_runs.append(("1x", len(rows), r, run_old(rows, Path(td))))
            same = sorted((d["id"], d["rep_id"], d["reason"]) for d in r["drops"]) == \
                sorted((d["id"], d["rep_id"], d["reason"]) for d in new)
            results.append((f"new dedup.find_duplicates on Ray Data, 2 CPUs (== local: {same})",
                            score(rows, ref, r["drops"]), r["wall_s"]))
            if a.scale10:
                big = planted_corpus(n_base=a.n_base * 10, seed=a.seed + 1, n_templates=max(6, a.n_base // 10))
                ray_runs.append(("10x", len(big), run_ray(big, Path(td), "big"), run_old(big, Path(td), "big")))
    print()
    print("| method | recall (pairs >= 0.8 caught) | recall at 0.80-0.85 | false removal (pairs <= 0.7) | dropped | "
          "unjustified drops | dup pairs both kept | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s, w in results:
        print(f"| {name} | {s['recall']:.1%} of {s['pairs_ge']} | {s['recall_near_t']:.1%} of {s['pairs_near_t']} | "
              f"{s['false_removal']:.1%} of {s['pairs_le']} | "
              f"{s['dropped']} | {s['unjustified']} | {s['dup_pairs_both_kept']} | {w:.1f} |")
    if ray_runs:
        print()
        print("| corpus | documents | Ray wall s | Ray driver peak USS | largest Ray worker peak USS | "
              "old NearDup process USS at the end (growth while indexing) | old NearDup wall s |")
        print("|---|---|---|---|---|---|---|")
        for tag, n, r, o in ray_runs:
            print(f"| {tag} | {n} | {r['wall_s']:.1f} | {r['peak_driver_rss'] / 2**20:.0f} MB | "
                  f"{r['peak_worker_rss'] / 2**20:.0f} MB | {o['peak_rss'] / 2**20:.0f} MB "
                  f"(+{(o['peak_rss'] - o['rss_before']) / 2**20:.0f} MB) | {o['wall_s']:.1f} |")
    print(f"\n(in-process run's peak RSS: {max(rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024:.0f}"
          " MB; the old NearDup index holds every kept document's 64 values + band tables in one process)")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
