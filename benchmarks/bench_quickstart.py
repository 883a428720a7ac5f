"""Benchmark: wall time of `ellama quickstart` (the whole tiny chain on CPU) per stage, and the two numbers it prints.

Not a test (the target is under 10 minutes on 2 cores after install; the CI test runs a shortened chain). Run under
the heavy-work lock::

    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_quickstart.py            # fresh out, warm cache
    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_quickstart.py --cold     # also retrain the base

It runs ``ellama quickstart --fresh --out OUT --json`` in a fresh process (``--cold``: with an empty $ELLAMA_CACHE,
so the tiny base is built and pretrained on the general sample too), then prints each stage's wall time from
OUT/report.json, the process's total wall time and peak RSS (``wait4``), the CPU count, and domain_gain_pct /
general_regression_pct of the final model against the base.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ellama-bench-quickstart")
    ap.add_argument("--cold", action="store_true", help="empty $ELLAMA_CACHE: build and pretrain the tiny base too")
    ap.add_argument("extra", nargs="*", help="extra `ellama quickstart` flags, e.g. -- --no-align")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.cold:
        env["ELLAMA_CACHE"] = tempfile.mkdtemp(prefix="ellama-cache-")
    cmd = [str(ROOT / ".venv" / "bin" / "ellama"), "quickstart", "--fresh", "--out", str(args.out), "--json", *args.extra]
    print("$", " ".join(cmd), "(cold cache)" if args.cold else "")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"quickstart failed (exit {os.waitstatus_to_exitcode(status)}):\n{err[-3000:]}")
    report = json.loads((args.out / "report.json").read_text())
    print(f"\n{'stage':<42}{'wall s':>10}")
    for d in report["stage_details"]:
        print(f"{d['name']:<42}{'reused' if d['reused'] else format(d['seconds'], '.1f'):>10}")
    print(f"{'sum of stages':<42}{sum(report['stages'].values()):>10.1f}")
    print(f"{'process wall (incl. imports, generation)':<42}{wall:>10.1f}   target < {TARGET_S} s: "
          f"{'yes' if wall < TARGET_S else 'NO'}")
    print(f"peak RSS {usage.ru_maxrss / 1024:.0f} MB, {os.cpu_count()} CPUs")
    print(f"\nfinal model: {report['final_model']} ({report['hf_dir']})")
    for row in report["eval"]:
        print(f"  {row['model']:<8} domain score {row['domain_score']:.3f}  general score {row['general_score']:.3f}  "
              f"ppl domain {row.get('ppl_domain', float('nan')):.1f}  ppl general {row.get('ppl_general', float('nan')):.1f}")
    print(f"domain_gain_pct {report['domain_gain_pct']:+.2f} %   general_regression_pct "
          f"{report['general_regression_pct']:+.2f} %")


if __name__ == "__main__":
    main()
