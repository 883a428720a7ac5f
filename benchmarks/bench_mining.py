"""Benchmark: domain mining (issue 11). Two parts, both printed side by side.

1. **Library comparison on the planted test** (``tools/make_planted.py``: 4,000 general documents, 8% of them hard
   negatives, plus 200 free-prose e-commerce documents in en/de/fr/es, seeded). Every candidate is trained the way
   ``ellama data classify`` trains: the bundled catalog sample (``ellama_recipes/sample_data/domain``, rendered
   records) against the pool itself, 3-fold cross-fitted so each pool document is scored by a model that did not
   see it. Printed: precision and recall when mining a budget equal to the planted count (top 200), ROC AUC, fit
   seconds (3 folds) and scoring documents/second (one process). Candidates: scikit-learn
   ``HashingVectorizer`` + ``MultinomialNB`` (what ``ellama data classify`` uses), + ``SGDClassifier`` (log loss),
   + ``LogisticRegression``; fastText 0.9.3 supervised (word 1-2 grams, with and without character 3-5 grams).
   fastText is optional: ``pip install -c constraints.txt '.[mining-bench]'`` (an sdist; g++ builds it).
2. **Throughput of ``ellama data classify``** (the real command in a subprocess) streaming a generated general corpus
   of ``--size-mb`` MB per worker count: documents/second of the whole command (imports and training included) and
   of the scoring pass, CPU seconds and the peak RSS of the process tree (main + workers). ``--scale10`` also mines
   the same corpus passed 10 times; peak RSS must stay flat.

Default run (about 2 minutes on 2 cores)::

    python benchmarks/bench_mining.py

Large run (take the shared lock on the dev machine)::

    flock /tmp/ellama-heavy.lock python benchmarks/bench_mining.py --skip-compare --size-mb 100 --workers 1 2 --scale10

Measured 2026-11-26 on the 2-core dev machine (shared with other jobs)::

    planted test: 4000 general + 200 planted documents (en/de/fr/es); domain training: 3127 catalog records; budget = 200
    classifier                                                 precision  recall    AUC  fit s  score docs/s
    scikit-learn HashingVectorizer + MultinomialNB (chosen)        0.995   0.995  1.000    1.1         12742
    scikit-learn HashingVectorizer + SGDClassifier(log)            0.725   0.725  0.976    0.9          9412
    scikit-learn HashingVectorizer + LogisticRegression            0.685   0.685  0.968    9.0         13834
    fastText 0.9.3 supervised, word 1-2 grams                      0.850   0.850  0.994    1.4         81575
    fastText 0.9.3 + char 3-5 grams                                0.855   0.855  0.990    2.6         59833

    ellama data classify --mine-fraction 0.005   workers     MB      docs  wall s   docs/s score docs/s   CPU s peak RSS MB
                                                       1    100    204533    15.6    13132        20304    15.8         448
                                                       2    100    204533    12.2    16718        29880    18.3         999
       (corpus x10)                                    2   1000   2045330    68.5    29847        34641   116.1        1010
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

FOLDS = 3


def _pool(seed: int = 7):
    import make_planted

    rows, labels = [], []
    for doc, planted in make_planted.generate_pool(4000, 200, seed):
        rows.append(doc["text"])
        labels.append(planted)
    return rows, np.array(labels)


def _domain_texts() -> list[str]:
    from ellama_recipes.data.bundled import sample_dir
    from ellama_recipes.data.records import expand_paths, iter_text_rows

    return [r["text"] for p in expand_paths([sample_dir() / "domain"]) for r in iter_text_rows(p)]


# ------------------------------------------------------------------------------------------- candidates
# each: fit(pos, neg) -> score(texts) -> np.ndarray (higher = more domain)


def sk_nb(pos, neg):
    from ellama_recipes.data.classify import DomainClassifier

    return DomainClassifier().fit(pos, neg).score


def _sk_linear(make):
    def fit(pos, neg):
        from ellama_recipes.data.classify import _vectorizer

        vec = _vectorizer()
        m = make().fit(vec.transform(pos + neg), np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        return lambda texts: m.decision_function(vec.transform(texts))
    return fit


def sk_sgd():
    from sklearn.linear_model import SGDClassifier

    return _sk_linear(lambda: SGDClassifier(loss="log_loss", alpha=1e-5, class_weight="balanced", random_state=0))


def sk_logreg():
    from sklearn.linear_model import LogisticRegression

    return _sk_linear(lambda: LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000))


def fasttext_fit(**kw):
    def fit(pos, neg):
        import fasttext

        fd, path = tempfile.mkstemp(suffix=".txt")
        rng = np.random.default_rng(0)
        data = [("__label__domain", t) for t in pos] + [("__label__general", t) for t in neg]
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i in rng.permutation(len(data)):
                lab, t = data[i]
                f.write(f"{lab} {' '.join(t.lower().split())}\n")
        try:
            m = fasttext.train_supervised(path, verbose=0, thread=1, seed=1, **kw)
        finally:
            os.unlink(path)

        def score(texts):
            labs, probs = m.predict([" ".join(t.lower().split()) for t in texts], k=2)
            return np.array([p[list(lb).index("__label__domain")] for lb, p in zip(labs, probs)])
        return score
    return fit


def compare() -> None:
    from sklearn.metrics import roc_auc_score

    pool, y = _pool()
    dom = _domain_texts()
    k = int(y.sum())
    rng = np.random.default_rng(1234)
    d_fold = rng.permutation(len(dom)) % FOLDS
    g_fold = np.arange(len(pool)) % FOLDS
    cands = [("scikit-learn HashingVectorizer + MultinomialNB (chosen)", sk_nb),
             ("scikit-learn HashingVectorizer + SGDClassifier(log)", sk_sgd()),
             ("scikit-learn HashingVectorizer + LogisticRegression", sk_logreg())]
    try:
        import fasttext  # noqa: F401

        cands += [("fastText 0.9.3 supervised, word 1-2 grams", fasttext_fit(wordNgrams=2, epoch=10, lr=0.5, dim=32)),
                  ("fastText 0.9.3 + char 3-5 grams", fasttext_fit(wordNgrams=2, epoch=10, lr=0.1, dim=32, minn=3,
                                                                    maxn=5, bucket=200_000))]
    except ImportError:
        print("fastText not installed (pip install -c constraints.txt '.[mining-bench]'): its rows are skipped")
    print(f"planted test: {len(pool) - k} general + {k} planted documents (en/de/fr/es); domain training: "
          f"{len(dom)} catalog records; budget = {k}; {FOLDS}-fold cross-fitted")
    print(f"{'classifier':<58}{'precision':>10}{'recall':>8}{'AUC':>7}{'fit s':>7}{'score docs/s':>14}")
    for name, fit in cands:
        scores = np.zeros(len(pool))
        t_fit = t_score = 0.0
        for f in range(FOLDS):
            t = time.perf_counter()
            score = fit([x for x, g in zip(dom, d_fold) if g != f], [x for x, g in zip(pool, g_fold) if g != f])
            t_fit += time.perf_counter() - t
            idx = np.nonzero(g_fold == f)[0]
            t = time.perf_counter()
            scores[idx] = score([pool[i] for i in idx])
            t_score += time.perf_counter() - t
        top = np.argsort(-scores, kind="stable")[:k]
        tp = int(y[top].sum())
        print(f"{name:<58}{tp / k:>10.3f}{tp / y.sum():>8.3f}{roc_auc_score(y, scores):>7.3f}{t_fit:>7.1f}"
              f"{len(pool) / t_score:>14.0f}", flush=True)


# ------------------------------------------------------------------------------------------- throughput


def make_corpus(path: Path, size_mb: float) -> int:
    import make_planted

    target, written, n = int(size_mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        # 0.5% planted prose; the generator streams, so any size is constant memory
        for doc, _ in make_planted.generate_pool(10**9, 5 * 10**6, seed=11):
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
            if written >= target:
                break
    return n


def throughput(size_mb: float, workers: list[int], scale10: bool, work: Path) -> None:
    from bench_tokenize import run_measured

    from ellama_recipes.data.bundled import sample_dir

    corpus = work / "general.jsonl"
    if not corpus.exists() or abs(corpus.stat().st_size / 1e6 - size_mb) > size_mb * 0.02:
        t = time.perf_counter()
        n = make_corpus(corpus, size_mb)
        print(f"generated {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, {n} docs) in {time.perf_counter() - t:.1f}s")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"{'ellama data classify --mine-fraction 0.005':<44}{'workers':>8}{'MB':>7}{'docs':>10}{'wall s':>8}"
          f"{'docs/s':>9}{'score docs/s':>13}{'CPU s':>8}{'peak RSS MB':>12}")
    runs = [(w, 1) for w in workers] + ([(max(workers), 10)] if scale10 else [])
    for w, times in runs:
        out = work / f"out_w{w}_x{times}"
        cmd = [sys.executable, "-m", "ellama_recipes", "data", "classify", "--domain", str(sample_dir() / "domain"),
               "--out", str(out), "--mine-fraction", "0.005", "--workers", str(w)]
        for _ in range(times):
            cmd += ["--general", str(corpus)]
        wall, peak, cpu = run_measured(cmd, env)
        rep = json.loads((out / "report.json").read_text())
        docs = rep["accounting"]["general_lines_in"]
        label = "" if times == 1 else f" (corpus x{times})"
        print(f"{'  ' + label:<44}{w:>8}{size_mb * times:>7.0f}{docs:>10}{wall:>8.1f}{docs / wall:>9.0f}"
              f"{rep['documents_per_second']:>13.0f}{cpu:>8.1f}{peak / 2**20:>12.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=20.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scale10", action="store_true", help="also mine the corpus passed 10 times (RSS flatness)")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if not args.skip_compare:
        compare()
    if not args.skip_throughput:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_mining_"))
        work.mkdir(parents=True, exist_ok=True)
        throughput(args.size_mb, args.workers, args.scale10, work)


if __name__ == "__main__":
    main()
