"""Benchmark: wall time of `ellama quickstart` (the whole tiny chain on CPU) per stage, quiet and under CPU load.

Not a test (the contract: the first run, base included, under 300 s of stages and at most 300 console lines on
2 cores; the CI test runs a shortened chain). Run under the heavy-work lock::

    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_quickstart.py --cold          # quiet only
    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_quickstart.py --cold --load   # + under load

Each run is ``ellama quickstart --fresh --out OUT`` in a fresh process (``--cold``: with an empty $ELLAMA_CACHE, so
the tiny base is built and pretrained too), its console captured (the line count is what a user sees). ``--load``
runs it a second time while ``--load-procs`` (default: the CPU count) busy-looping processes compete for the cores,
and prints both columns side by side with the loaded / quiet ratio per stage: the plain-torch base stage should
degrade no worse than the engine stages. Also printed: the process's wall time and peak RSS (``wait4``), and the
replay comparison of the (quiet) run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 300
TARGET_LINES = 300


def _burn(stop) -> None:  # one busy core
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def run_once(out: Path, cold: bool, extra: list[str], label: str) -> dict:
    env = dict(os.environ, COLUMNS="100")
    if cold:
        env["ELLAMA_CACHE"] = tempfile.mkdtemp(prefix="ellama-cache-")
    cmd = [str(ROOT / ".venv" / "bin" / "ellama"), "quickstart", "--fresh", "--out", str(out), *extra]
    print(f"$ {' '.join(cmd)}   [{label}{', cold cache' if cold else ''}]", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"quickstart failed (exit {os.waitstatus_to_exitcode(status)}):\n{console[-3000:]}")
    (out / "console.txt").write_text(console)
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall": wall, "rss_mb": usage.ru_maxrss / 1024, "lines": len(console.splitlines()),
            "width": max((len(x) for x in console.splitlines()), default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ellama-bench-quickstart")
    ap.add_argument("--cold", action="store_true", help="empty $ELLAMA_CACHE: build and pretrain the tiny base too")
    ap.add_argument("--load", action="store_true", help="also run under a parallel CPU load, side by side")
    ap.add_argument("--load-procs", type=int, default=os.cpu_count() or 2, help="busy processes for --load")
    ap.add_argument("extra", nargs="*", help="extra `ellama quickstart` flags, e.g. -- --no-align")
    args = ap.parse_args()
    runs = {"quiet": run_once(args.out / "quiet", args.cold, args.extra, "quiet")}
    if args.load:
        stop = mp.Event()
        procs = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.load_procs)]
        for p in procs:
            p.start()
        try:
            runs["loaded"] = run_once(args.out / "loaded", args.cold, args.extra, f"{args.load_procs} busy procs")
        finally:
            stop.set()
            for p in procs:
                p.join(5)
    names = list(runs["quiet"]["report"]["stages"])
    head = f"{'stage':<40}" + "".join(f"{k + ' s':>10}" for k in runs) + ("   loaded/quiet" if args.load else "")
    print("\n" + head)
    for n in names:
        vals = [r["report"]["stages"].get(n, 0.0) for r in runs.values()]
        ratio = f"   x{vals[1] / vals[0]:.2f}" if args.load and vals[0] > 0 else ""
        print(f"{n:<40}" + "".join(f"{v:>10.1f}" for v in vals) + ratio)
    sums = [sum(r["report"]["stages"].values()) for r in runs.values()]
    print(f"{'sum of stages':<40}" + "".join(f"{v:>10.1f}" for v in sums)
          + (f"   x{sums[1] / sums[0]:.2f}" if args.load else ""))
    print(f"{'process wall (incl. imports, generation)':<40}" + "".join(f"{r['wall']:>10.1f}" for r in runs.values()))
    print(f"{'console lines':<40}" + "".join(f"{r['lines']:>10d}" for r in runs.values()))
    print(f"{'widest console line':<40}" + "".join(f"{r['width']:>10d}" for r in runs.values()))
    print(f"{'peak RSS MB':<40}" + "".join(f"{r['rss_mb']:>10.0f}" for r in runs.values()))
    q = runs["quiet"]
    print(f"targets (quiet): stages < {TARGET_S} s: {'yes' if sums[0] < TARGET_S else 'NO'}; console lines <= "
          f"{TARGET_LINES}: {'yes' if q['lines'] <= TARGET_LINES else 'NO'}   ({os.cpu_count()} CPUs)")
    rep = q["report"].get("replay")
    if rep:
        print(f"\n{'CPT arm':<16}{'ppl dom gain %':>16}{'ppl gen regr %':>16}{'task dom gain %':>17}"
              f"{'task gen regr %':>17}")
        for name, arm in (("1:1 replay", rep["with_replay"]), ("no replay", rep["without_replay"])):
            vals = [arm.get(k) for k in ("ppl_domain_gain_pct", "ppl_general_regression_pct", "domain_gain_pct",
                                         "general_regression_pct")]
            print(f"{name:<16}" + "".join(f"{v:>16.2f}" if v is not None else f"{'-':>16}" for v in vals))
        print(rep["verdict"])
    print(f"console of the quiet run: {args.out / 'quiet' / 'console.txt'}")


if __name__ == "__main__":
    main()
