"""Benchmark: tokenize + write a Megatron indexed dataset (``ellama data tokenize``), optionally side by side with
Megatron-LM's ``tools/preprocess_data.py`` on the same corpus, tokenizer and worker count.

Not a unit test (minutes, hundreds of MB). Run::

    python benchmarks/bench_tokenize.py --size-mb 200 --workers 1 2 --scale10
    python benchmarks/bench_tokenize.py --size-mb 200 --megatron-lm /path/to/Megatron-LM   # side by side

It prints, per tool and worker count: documents, tokens, wall seconds (whole process, imports included),
tokens/s, and peak RSS of the whole process tree (main + workers, sampled every 50 ms with psutil). With
``--scale10`` it also tokenizes the same corpus passed 10 times (10x the input size, streamed) and prints the peak
RSS, which must stay flat. Both tools write ``tokens + [eod]`` per document here (``--no-bos`` on our side, the
default of Megatron-LM core_v0.15's HuggingFaceTokenizer), and the script checks the two outputs are
byte-identical, so the comparison is like for like.

The corpus is generated (multilingual documents built from the bundled sample's texts, ~1.5 KB each,
deterministic). The tokenizer defaults to the tiny Llama-3-style tokenizer trained on the bundled sample;
``--tokenizer DIR`` uses any HF tokenizer directory (e.g. a real Llama 3.1 one).

Measured 2026-11-22 on the 2-core dev machine while other test suites were running (load average ~5, so wall
times are pessimistic; CPU seconds of the process tree are the contention-free comparison), 200 MB corpus,
117,122 documents, 41.2M tokens, tiny 4096-token Llama-3-style tokenizer, Megatron-LM core_v0.15.2::

    tool                         workers input MB     docs      tokens  wall s     tok/s   CPU s  tok/CPU-s peak RSS MB
    ellama data tokenize               1      200   117122    41190778   272.7    151072   111.5     369424         447
    Megatron-LM preprocess_data        1      200   117122    41190778   354.7    116129   213.3     193148        1702
                                speedup wall 1.30x, CPU 1.91x; outputs byte-identical: True
    ellama data tokenize               2      200   117122    41190778   138.5    297328   111.9     368071         582
    Megatron-LM preprocess_data        2      200   117122    41190778   339.6    121304   213.4     192976        2208
                                speedup wall 2.45x, CPU 1.91x; outputs byte-identical: True
    ellama data tokenize x10           2     2000  1171220   411907780  1358.2    303269  1021.9     403084         588

Megatron-LM's ``--workers 1`` runs two busy processes (an encode worker plus the writer); ours runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a JSONL corpus of about ``size_mb`` MB; returns the number of documents."""
    sys.path.insert(0, str(REPO))
    from ellama_recipes.data.tokenizer_train import sample_texts

    pool = list(sample_texts())
    rng = random.Random(seed)
    target = int(size_mb * 1e6)
    n = written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            k = rng.randint(2, 6)
            text = "\n\n".join(rng.choice(pool) for _ in range(k))
            line = json.dumps({"text": text, "lang": "mul"}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, float]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of the process tree, CPU seconds of the tree)."""
    c0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    out_chunks: list[str] = []
    import threading

    def reader():
        for line in proc.stdout:
            out_chunks.append(line)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    th.join()
    wall = time.perf_counter() - t0
    c1 = os.times()
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    tail = "".join(out_chunks)[-2000:]
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall, peak, cpu


def read_counts(prefix: str) -> tuple[int, int]:
    sys.path.insert(0, str(REPO))
    from ellama_recipes.data.indexed import read_back

    rb = read_back(prefix)
    return rb["documents"], rb["tokens"]


def ours(inputs: list[Path], tok: str, prefix: Path, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "ellama_recipes", "data", "tokenize", "--tokenizer", tok, "--out", str(prefix),
           "--side", "general", "--workers", str(workers), "--no-bos"]
    for p in inputs:
        cmd += ["--input", str(p)]
    return cmd


def megatron(mlm: Path, inp: Path, tok: str, prefix: Path, workers: int) -> list[str]:
    return [sys.executable, str(mlm / "tools/preprocess_data.py"), "--input", str(inp), "--output-prefix", str(prefix),
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok, "--append-eod",
            "--workers", str(workers), "--log-interval", "100000"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=200.0, help="corpus size in MB (>= 200 for the issue's numbers)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: train the tiny one)")
    ap.add_argument("--megatron-lm", type=Path, default=None, help="Megatron-LM checkout (core_v0.15.x) to compare")
    ap.add_argument("--scale10", action="store_true", help="also run ours on the corpus x10 (peak RSS flatness)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tok_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tok = args.tokenizer
    if tok is None:
        tok = str(work / "tok")
        if not (work / "tok/tokenizer.json").exists():
            sys.path.insert(0, str(REPO))
            from ellama_recipes.data.tokenizer_train import sample_texts, train_tokenizer

            train_tokenizer(sample_texts(), Path(tok), vocab_size=4096)
    corpus = work / "corpus.jsonl"
    if not corpus.exists() or abs(corpus.stat().st_size / 1e6 - args.size_mb) > args.size_mb * 0.02:
        t = time.perf_counter()
        n = make_corpus(corpus, args.size_mb)
        print(f"generated {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, {n} docs) in {time.perf_counter() - t:.1f}s")
    size_mb = corpus.stat().st_size / 1e6

    cols = f"{'tool':<28}{'workers':>8}{'input MB':>9}{'docs':>9}{'tokens':>12}{'wall s':>8}{'tok/s':>10}" \
           f"{'CPU s':>8}{'tok/CPU-s':>11}{'peak RSS MB':>12}"
    print(cols, flush=True)

    def line(name, w, mb, d, t, wall, cpu, peak):
        print(f"{name:<28}{w:>8}{mb:>9.0f}{d:>9}{t:>12}{wall:>8.1f}{t / wall:>10.0f}{cpu:>8.1f}{t / cpu:>11.0f}"
              f"{peak / 2**20:>12.0f}", flush=True)

    for w in args.workers:
        pre = work / f"ours_w{w}"
        wall, peak, cpu = run_measured(ours([corpus], tok, pre, w), env)
        d, t = read_counts(str(pre))
        line("ellama data tokenize", w, size_mb, d, t, wall, cpu, peak)
        if args.megatron_lm:
            mpre = work / f"mlm_w{w}"
            menv = dict(env, PYTHONPATH=str(args.megatron_lm) + os.pathsep + env["PYTHONPATH"])
            wall_m, peak_m, cpu_m = run_measured(megatron(args.megatron_lm, corpus, tok, mpre, w), menv)
            mp = str(mpre) + "_text_document"
            dm, tm = read_counts(mp)
            same = all(Path(str(pre) + e).read_bytes() == Path(mp + e).read_bytes() for e in (".bin", ".idx"))
            line("Megatron-LM preprocess_data", w, size_mb, dm, tm, wall_m, cpu_m, peak_m)
            print(f"{'':<28}speedup wall {wall_m / wall:.2f}x, CPU {cpu_m / cpu:.2f}x; outputs byte-identical: {same}",
                  flush=True)
            for e in (".bin", ".idx"):
                Path(mp + e).unlink(missing_ok=True)
        for e in (".bin", ".idx"):
            Path(str(pre) + e).unlink(missing_ok=True)
    if args.scale10:
        w = max(args.workers)
        pre = work / f"ours_x10_w{w}"
        wall, peak, cpu = run_measured(ours([corpus] * 10, tok, pre, w), env)
        d, t = read_counts(str(pre))
        line("ellama data tokenize x10", w, size_mb * 10, d, t, wall, cpu, peak)
        for ext in (".bin", ".idx"):
            Path(str(pre) + ext).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
