"""`ellama data build` on Ray Data vs the in-process pipeline (issue 19): throughput, memory, a 1T-token projection.

    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_ray_build.py [--scales 1,10] [--cpus 1,2]

Everything runs inside one loopback-only network + pid namespace (``unshare -n -p -f --mount-proc``; needs root):
the script re-runs itself there. Corpora: the bundled sample (1x: 3,139 domain records + 3,388 general documents,
3 MB) and a k-times corpus made from it (every copy's words get a copy-specific suffix and product ids a copy
suffix, so copies are neither exact nor near duplicates of each other and the corpus really is k times bigger).

Printed side by side:
1. throughput on the 1x corpus at each CPU count: wall seconds, input records/s, tokens/s; Ray (local instance
   started by the build, ``--workers N``) vs in-process (``--executor inprocess --workers N``), same corpus, same
   run; the Ray/in-process time ratio;
2. memory, 1x vs k-times corpus: peak RSS (VmHWM) of the driver and of the largest Ray worker process (and how
   many worker processes there were), Ray vs in-process; and the in-process cleaner's MinHash-LSH index alone
   (tracemalloc while inserting every cleaned general document of the corpus);
3. a projection for a 1T-token build on N nodes of C cores from the measured per-core tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "ellama_recipes" / "sample_data"
SUFFIX = "abcdefghijklmnopqrstuvwxyz"


def make_corpus(k: int, out: Path) -> tuple[Path, Path]:
    """``out/domain`` and ``out/general``: the sample, ``k`` times, copies made distinct (see module docstring)."""
    import re

    word = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
    for side in ("domain", "general"):
        (out / side).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / side).glob("*.jsonl")):
            with open(out / side / f.name, "w", encoding="utf-8") as w:
                for c in range(k):
                    suf = "" if c == 0 else SUFFIX[c % 26] + SUFFIX[(c // 26) % 26]
                    for line in f.read_text(encoding="utf-8").splitlines():
                        if c == 0:
                            w.write(line + "\n")
                            continue
                        obj = json.loads(line)
                        for key in ("text", "description", "title"):
                            if isinstance(obj.get(key), str):
                                obj[key] = word.sub(lambda m: m.group(0) + suf, obj[key])
                        for key in ("id", "product_id"):
                            if isinstance(obj.get(key), str):
                                obj[key] += f"-{c}"
                        if isinstance(obj.get("product_ids"), list):
                            obj["product_ids"] = [f"{p}-{c}" for p in obj["product_ids"]]
                        w.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return out / "domain", out / "general"


class PeakRSS:
    """Polls /proc every 0.1 s for the peak RSS (VmHWM) of a process and all its descendants."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, {}, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _tree(self) -> list[int]:
        kids: dict[int, list[int]] = {}
        for e in os.scandir("/proc"):
            if e.name.isdigit():
                try:
                    with open(f"/proc/{e.name}/stat", "rb") as f:
                        st = f.read()
                    kids.setdefault(int(st[st.rindex(b")") + 2:].split()[1]), []).append(int(e.name))
                except (OSError, ValueError):
                    pass
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(kids.get(p, []))
        return out

    def _run(self):
        while not self._stop.is_set():
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/status") as f:
                        st = dict(line.split(":", 1) for line in f if ":" in line)
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
                    kb = int(st.get("VmHWM", "0 kB").split()[0])
                    if kb > self.peak.get(p, (0, ""))[0]:
                        self.peak[p] = (kb, cmd)
                except (OSError, ValueError):
                    pass
            self._stop.wait(0.1)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        driver = self.peak.get(self.pid, (0, ""))[0]
        workers = [kb for p, (kb, cmd) in self.peak.items() if p != self.pid and cmd.startswith("ray::")]
        return {"driver_mb": round(driver / 1024, 1), "max_worker_mb": round(max(workers, default=0) / 1024, 1),
                "ray_workers": len(workers)}


def run_build(dom: Path, gen: Path, tok: Path, out: Path, executor: str, cpus: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "ellama_recipes", "data", "build", "--domain", str(dom), "--general", str(gen),
           "--tokenizer", str(tok), "--out", str(out), "--executor", executor, "--workers", str(cpus)]
    t0 = time.perf_counter()
    with open(str(out) + ".log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        mem = PeakRSS(proc.pid)
        rc = proc.wait()
    secs = time.perf_counter() - t0
    m = mem.stop()
    if rc != 0:
        raise SystemExit(f"build failed ({rc}): see {out}.log")
    rep = json.loads((out / "report.json").read_text())
    man = json.loads((out / "manifest.json").read_text())
    records = rep["stages"][0]["records_in"] + rep["stages"][1]["records_in"]
    tokens = sum(s["tokens"] for s in man["sources"])
    row = {"executor": executor, "cpus": cpus, "seconds": round(secs, 1), "records": records, "tokens": tokens,
           "records_per_s": round(records / secs, 1), "tokens_per_s": round(tokens / secs), **m}
    if "executor" in rep:  # the Ray build's own timings: Ray start-up and each stage (the rest: imports, driver)
        row["stage_seconds"] = rep["executor"]["seconds"]
    return row


def lsh_index_mb(clean_general: Path) -> float:
    """Memory held by the in-process cleaner's MinHash-LSH index after inserting every cleaned general document."""
    import tracemalloc

    from ellama_recipes.data.clean import NearDup

    tracemalloc.start()
    nd = NearDup()
    base = tracemalloc.get_traced_memory()[0]
    with open(clean_general, encoding="utf-8") as f:
        for line in f:
            nd.seen(json.loads(line)["text"])
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return round(used / 2**20, 1)


def inner(args) -> None:
    from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench19-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for d in ("home", "tmp"):
        (work / d).mkdir()
    env.update(HOME=str(work / "home"), TMPDIR=str(work / "tmp"), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1")
    tok = train_tokenizer(sample_texts(), work / "tok", vocab_size=4096)
    scales = [int(x) for x in args.scales.split(",")]
    cpus = [int(x) for x in args.cpus.split(",")]
    rows, mem = [], {}
    for k in scales:
        dom, gen = make_corpus(k, work / f"c{k}")
        for c in (cpus if k == scales[0] else [max(cpus)]):
            for ex in ("ray", "inprocess"):
                r = run_build(dom, gen, tok, work / f"out_{k}_{ex}_{c}", ex, c, env)
                r["scale"] = k
                rows.append(r)
                print(json.dumps(r), flush=True)
        mem[k] = lsh_index_mb(work / f"out_{k}_inprocess_{max(cpus)}" / "work" / "clean_general.jsonl")
    print("\n1. Throughput (1x corpus, same run)")
    print(f"{'cpus':>4} {'executor':>9} {'seconds':>8} {'records/s':>10} {'tokens/s':>9} {'ray/inproc time':>16}")
    for c in cpus:
        pair = {r["executor"]: r for r in rows if r["scale"] == scales[0] and r["cpus"] == c}
        for ex in ("ray", "inprocess"):
            r = pair[ex]
            ratio = f"{pair['ray']['seconds'] / pair['inprocess']['seconds']:.2f}" if ex == "ray" else ""
            print(f"{c:>4} {ex:>9} {r['seconds']:>8} {r['records_per_s']:>10} {r['tokens_per_s']:>9} {ratio:>16}")
    print("\n   Ray build's own timings (s): Ray start-up and each stage; the rest of the wall time is the CLI's imports,"
          " planning and Ray shut-down")
    for r in rows:
        if r["executor"] == "ray" and "stage_seconds" in r:
            print(f"   {r['scale']}x {r['cpus']} CPU(s): wall {r['seconds']}, "
                  + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())
                  + f", rest {r['seconds'] - sum(v or 0 for v in r['stage_seconds'].values()):.1f}")
    print(f"\n2. Peak RSS (MB), {' vs '.join(f'{k}x' for k in scales)} corpus, {max(cpus)} CPUs")
    print(f"{'scale':>5} {'executor':>9} {'records':>8} {'driver':>7} {'max worker':>11} {'workers':>8} "
          f"{'LSH index':>10}")
    for r in rows:
        if r["cpus"] == max(cpus):
            lsh = mem[r["scale"]] if r["executor"] == "inprocess" else ""
            print(f"{r['scale']:>5} {r['executor']:>9} {r['records']:>8} {r['driver_mb']:>7} "
                  f"{r['max_worker_mb']:>11} {r['ray_workers']:>8} {lsh:>10}")
    best = max((r for r in rows if r["executor"] == "ray"), key=lambda r: r["tokens_per_s"] / r["cpus"])
    per_core = best["tokens_per_s"] / best["cpus"]
    print(f"\n3. Projection for 1T tokens from the Ray build's measured {per_core:,.0f} tokens/s per core "
          f"(whole build, {best['scale']}x corpus, {best['cpus']} CPUs; linear scaling assumed):")
    for nodes, cores in ((1, 24), (8, 64), (60, 24), (64, 64)):
        hours = 1e12 / (per_core * nodes * cores) / 3600
        print(f"  {nodes:>3} nodes x {cores} cores: {hours:>9,.1f} h")
    (work / "bench.json").write_text(json.dumps({"rows": rows, "lsh_index_mb": mem}, indent=1))
    print(f"\n(raw rows: {work / 'bench.json'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--cpus", default="1,2")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        return inner(args)
    cmd = ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c", "ip link set lo up && exec " + shlex.join(
        [sys.executable, __file__, "--inner", "--scales", args.scales, "--cpus", args.cpus])]
    raise SystemExit(subprocess.call(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}))


if __name__ == "__main__":
    main()
