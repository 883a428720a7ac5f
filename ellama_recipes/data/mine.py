"""Mining domain documents out of a general corpus far larger than memory, by budget or by threshold.

Used by ``ellama data classify`` and ``ellama data build`` (``--mine-fraction F``, ``--mine-tokens N``,
``--threshold P``). Three streaming passes over the corpus, none of which holds documents in memory:

1. **sample**: every ``stride``-th line (``stride = lines / max_train``) is the general side of the classifier's
   training set (:func:`ellama_recipes.data.classify.train_folds`);
2. **score**: chunks of lines go to ``workers`` processes (each loads the saved models once); each returns float32
   log-odds (NaN for an invalid line), the language and, for a token budget, the token count (``bos`` + text +
   ``eod``, what ``ellama data tokenize`` will write). They are appended to small per-document files
   (``scores.f32``, ``langs.u16``, ``tokens.u32``: 4 + 2 + 4 bytes a document) and summed into a 65,536-bin histogram
   over the score's float bits;
3. **select + route**: the exact cut-off for the budget is found by radix selection over those files (the
   histogram gives the bin, one more read gives the value, ties are broken by corpus order), then the corpus is read
   once more and each line is copied to ``mined.jsonl`` (with its score) or to ``general_<lang>.jsonl``.

Memory: the models (about 50 MB a process), one chunk per worker in flight, the histograms and the report's few
example documents: constant in the corpus size. Budgets pick the top-scoring documents in (score desc, corpus order):
``--mine-fraction F`` the first ``round(F * documents)``, ``--mine-tokens N`` the longest prefix of that order whose
tokens sum to at most ``N``; ``--threshold P`` every document with ``p(domain) >= P``.

Layout: corpus reading and pass 1 (score) live in data/mine_score.py; this module keeps the budget
(:class:`Budget`), pass 2 (select), pass 3 (route), the report and the entry point :func:`mine`, and re-exports the
names of data/mine_score.py.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ellama_recipes.data.classify import logit, sigmoid
from ellama_recipes.data.records import Reject
from ellama_recipes.errors import UserError

EXAMPLES = 5
QUANTILES = (0.5, 0.9, 0.99, 0.999)


@dataclass
class Budget:
    """How much to mine: exactly one of ``fraction`` (of the general documents), ``tokens``, ``threshold`` (p)."""

    fraction: float | None = None
    tokens: int | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("fraction", "tokens", "threshold") if getattr(self, k) is not None]
        if len(given) > 1:
            flags = {"fraction": "--mine-fraction", "tokens": "--mine-tokens", "threshold": "--threshold"}
            raise UserError(f"Give one mining budget, not {' and '.join(flags[g] for g in given)}: --mine-fraction F "
                            "(top share of general documents), --mine-tokens N (top documents up to N tokens) or "
                            "--threshold P (every document with p(domain) >= P).")
        if not given:
            self.threshold = 0.5
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"--mine-fraction {self.fraction} must be between 0 and 1 (e.g. 0.05 mines the top 5% "
                            "of general documents).")
        if self.tokens is not None and self.tokens < 0:
            raise UserError(f"--mine-tokens {self.tokens} must be >= 0 (e.g. 1000000).")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise UserError(f"--threshold {self.threshold} must be between 0 and 1 (e.g. 0.5).")

    @property
    def kind(self) -> str:
        return "fraction" if self.fraction is not None else "tokens" if self.tokens is not None else "threshold"

    def as_dict(self) -> dict:
        return {"by": self.kind, "value": getattr(self, self.kind)}


# corpus reading and pass 1 (score) live in data/mine_score.py (re-exported here)
from ellama_recipes.data.mine_score import (CHUNK_DOCS, HIST_BINS, Scored, _chunks, _init_worker,  # noqa: F401
                                            _keys, _lines, _score_chunk, _sourced_lines, _unkey, count_lines,
                                            parse_line, sample_general, score_corpus)


# ------------------------------------------------------------------------------------------------ pass 2: select

READ = 1 << 20


def _read_arrays(sc: Scored, tokens: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(first index, scores, tokens) in chunks of READ documents from the pass-1 files."""
    with open(sc.work / "scores.f32", "rb") as fs, (open(sc.work / "tokens.u32", "rb") if tokens else open(os.devnull, "rb")) as ft:
        first = 0
        while True:
            s = np.frombuffer(fs.read(READ * 4), np.float32)
            if not s.size:
                return
            t = np.frombuffer(ft.read(READ * 4), np.uint32) if tokens else None
            yield first, s, t
            first += s.size


@dataclass
class Selection:
    """Mined iff ``key > key_cut`` or (``key == key_cut`` and it is among the first ``ties`` such documents)."""

    key_cut: int  # uint32 key (order-preserving image of the float32 score)
    ties: float  # how many documents with key == key_cut are mined, in corpus order (inf: all)
    budget: dict


def _walk(counts: np.ndarray, weights: np.ndarray, budget: float) -> tuple[int, float]:
    """Walk bins from the top taking whole bins while the weight stays <= budget; returns (boundary bin, weight
    taken above it). The boundary bin is -1 when every bin fits."""
    cum = 0.0
    for b in np.nonzero(counts)[0][::-1]:
        if cum + weights[b] > budget:
            return int(b), cum
        cum += weights[b]
    return -1, cum


def select(sc: Scored, budget: Budget) -> Selection:
    """Exact cut-off for ``budget`` over the pass-1 files (two or three reads of 4-8 bytes a document)."""
    if budget.kind == "threshold":
        cut = np.float32(logit(budget.threshold))
        return Selection(int(_keys(np.array([cut], np.float32))[0]), math.inf, budget.as_dict())
    by_tokens = budget.kind == "tokens"
    if by_tokens and not sc.has_tokens:
        raise UserError("--mine-tokens needs a tokenizer to count tokens: pass --tokenizer DIR (as for `ellama data "
                        "tokenize`).")
    limit = float(budget.tokens) if by_tokens else float(round(budget.fraction * sc.valid))
    w1 = sc.hist_tokens.astype(np.float64) if by_tokens else sc.hist.astype(np.float64)
    b1, cum = _walk(sc.hist, w1, limit)
    if b1 < 0:  # everything fits
        return Selection(0, math.inf, budget.as_dict())
    c2 = np.zeros(HIST_BINS, np.int64)
    w2 = np.zeros(HIST_BINS, np.float64)
    for _, s, t in _read_arrays(sc, by_tokens):
        ok = ~np.isnan(s)
        k = _keys(s[ok])
        m = (k >> 16) == b1
        lo = (k[m] & 0xFFFF).astype(np.int64)
        c2 += np.bincount(lo, minlength=HIST_BINS)
        w2 += np.bincount(lo, weights=(t[ok][m].astype(np.float64) if by_tokens else None), minlength=HIST_BINS)
    b2, cum2 = _walk(c2, w2, limit - cum)
    key_cut = (b1 << 16) | b2
    left = limit - cum - cum2  # budget left for documents with key == key_cut
    if not by_tokens:
        return Selection(key_cut, int(round(left)), budget.as_dict())
    ties = 0  # longest prefix (corpus order) of the tied documents that fits
    for _, s, t in _read_arrays(sc, True):
        ok = ~np.isnan(s)
        tied = np.nonzero(ok & (_keys(np.where(ok, s, 0).astype(np.float32)) == key_cut))[0]
        if not tied.size:
            continue
        c = np.cumsum(t[tied].astype(np.float64))
        fit = int(np.searchsorted(c, left, side="right"))
        ties += fit
        if fit < tied.size:
            break
        left -= c[-1]
    return Selection(key_cut, ties, budget.as_dict())


# ------------------------------------------------------------------------------------------------ pass 3: route


@dataclass
class MineResult:
    lines: int
    valid: int
    mined: int
    kept: int
    rejected: Counter
    mined_tokens: int | None
    kept_files: dict[str, Path]  # lang -> general_<lang>.jsonl
    mined_path: Path
    report: dict


def route(paths: list[Path], sc: Scored, sel: Selection, mined_path: Path, kept_dir: Path, *,
          kept_prefix: str = "general_", progress: Callable[[int], None] | None = None,
          on_reject: Callable | None = None) -> MineResult:
    """Pass 3: copy each line to ``mined_path`` (with its score) or ``kept_dir/<prefix><lang>.jsonl``."""
    kept_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, object] = {}
    kept_files: dict[str, Path] = {}
    per_lang: Counter = Counter()
    top: list = []  # min-heap of (score, index, text) of mined documents
    near: list = []  # min-heap of the highest-scoring documents not mined
    n_mined = n_kept = 0
    mined_tokens = 0
    min_mined: float | None = None
    ties_seen = 0
    rejects_in = open(sc.work / "rejects.tmp.jsonl", encoding="utf-8")  # in corpus order
    lines = _sourced_lines(paths)
    fl = open(sc.work / "langs.u16", "rb")
    mf = open(mined_path, "w", encoding="utf-8")
    try:
        for first, s, t in _read_arrays(sc, sc.has_tokens):
            lang_ids = np.frombuffer(fl.read(s.size * 2), np.uint16)
            ok = ~np.isnan(s)
            keys = _keys(np.where(ok, s, 0).astype(np.float32))
            is_mined = ok & (keys > sel.key_cut)
            tied = np.nonzero(ok & (keys == sel.key_cut))[0]
            if math.isinf(sel.ties):
                is_mined[tied] = True
            else:
                is_mined[tied[: max(0, int(sel.ties) - ties_seen)]] = True
                ties_seen += tied.size
            for k in range(s.size):
                src, raw = next(lines)
                i = first + k
                if not ok[k]:
                    at, reason, detail = json.loads(rejects_in.readline())
                    assert at == i, "rejects out of step with the corpus (bug)"
                    if on_reject is not None:
                        on_reject(Reject(reason, src, detail))
                    continue
                score = float(s[k])
                lang = sc.langs[lang_ids[k]]
                if is_mined[k]:
                    text, _ = parse_line(raw)
                    mf.write(json.dumps({"text": text, "lang": lang, "score": round(score, 4),
                                         "p_domain": round(float(sigmoid(score)), 6), "source": src},
                                        ensure_ascii=False) + "\n")
                    n_mined += 1
                    min_mined = score if min_mined is None else min(min_mined, score)
                    per_lang[lang] += 1
                    if t is not None:
                        mined_tokens += int(t[k])
                    _keep_best(top, score, src, raw)
                else:
                    if lang not in files:
                        kept_files[lang] = kept_dir / f"{kept_prefix}{lang}.jsonl"
                        files[lang] = open(kept_files[lang], "wb")
                    files[lang].write(raw if raw.endswith(b"\n") else raw + b"\n")
                    n_kept += 1
                    _keep_best(near, score, src, raw)
            if progress:
                progress(s.size)
    finally:
        fl.close()
        mf.close()
        rejects_in.close()
        for f in files.values():
            f.close()
    assert next(lines, None) is None, "corpus changed while mining (bug or concurrent writer)"
    if sc.lines != n_mined + n_kept + sum(sc.rejected.values()):
        raise AssertionError(f"mine: lines {sc.lines} != mined {n_mined} + kept {n_kept} + rejected "
                             f"{sum(sc.rejected.values())} (bug)")
    report = _report(sc, sel, n_mined, n_kept, mined_tokens if sc.has_tokens else None, per_lang, top, near,
                     min_mined)
    return MineResult(sc.lines, sc.valid, n_mined, n_kept, sc.rejected, mined_tokens if sc.has_tokens else None,
                      kept_files, mined_path, report)


def _keep_best(heap: list, score: float, src: str, raw: bytes) -> None:
    item = (score, src, raw)
    if len(heap) < EXAMPLES:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _examples(heap: list) -> list[dict]:
    out = []
    for score, src, raw in sorted(heap, key=lambda x: -x[0]):
        text, lang = parse_line(raw)
        snippet = " ".join(text.split())
        out.append({"source": src, "score": round(score, 4), "p_domain": round(float(sigmoid(score)), 6),
                    "lang": lang, "text": snippet[:300] + ("..." if len(snippet) > 300 else "")})
    return out


def _bin_value(b: int) -> float:
    return float(_unkey([(b << 16) | 0x8000])[0])


def quantiles(hist: np.ndarray, qs=QUANTILES) -> dict[str, float]:
    """Score quantiles from the 65,536-bin histogram (bin centre; relative precision about 2**-8)."""
    n = int(hist.sum())
    if n == 0:
        return {}
    cum = np.cumsum(hist)
    out = {}
    for q in qs:
        b = int(np.searchsorted(cum, q * n, side="left"))
        out[f"q{q:g}"] = round(_bin_value(min(b, HIST_BINS - 1)), 4)
    nz = np.nonzero(hist)[0]
    out["min"] = round(_bin_value(int(nz[0])), 4)
    out["max"] = round(_bin_value(int(nz[-1])), 4)
    return out


def _report(sc, sel, n_mined, n_kept, mined_tokens, per_lang, top, near, min_mined) -> dict:
    q = quantiles(sc.hist)
    return {
        "budget": sel.budget,
        "general_documents": sc.valid,
        "mined": n_mined,
        "mined_fraction": round(n_mined / sc.valid, 6) if sc.valid else 0.0,
        "mined_tokens": mined_tokens,
        "kept": n_kept,
        "rejected": dict(sorted(sc.rejected.items())),
        "score": "log-odds of domain (sklearn MultinomialNB); p_domain = 1 / (1 + exp(-score))",
        "min_mined_score": None if min_mined is None else round(min_mined, 4),
        "min_mined_p_domain": None if min_mined is None else round(float(sigmoid(min_mined)), 6),
        "score_quantiles_general": q,
        "p_domain_quantiles_general": {k: round(float(sigmoid(v)), 6) for k, v in q.items()},
        "mined_per_language": dict(sorted(per_lang.items())),
        "top_mined": _examples(top),
        "nearest_not_mined": _examples(near),
        "score_seconds": round(sc.seconds, 2),
        "documents_per_second": round(sc.lines / sc.seconds, 1) if sc.seconds else None,
    }


def histogram_png(sc: Scored, cut: float | None, path: Path, title: str = "general documents") -> Path:
    """Histogram of the general documents' scores (log counts) with the lowest mined score marked; PNG via
    matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nz = np.nonzero(sc.hist)[0]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    if nz.size:
        vals = np.array([_bin_value(int(b)) for b in nz])
        counts = sc.hist[nz]
        edges = np.linspace(vals.min(), vals.max() + 1e-6, 81)
        binned, _ = np.histogram(vals, bins=edges, weights=counts)
        ax.bar(edges[:-1], binned, width=np.diff(edges), align="edge", color="#4c72b0", log=True)
        if cut is not None:
            ax.axvline(cut, color="#c44e52", linestyle="--", label=f"lowest mined score {cut:.2f}")
            ax.legend()
    ax.set_xlabel("domain score (log-odds)")
    ax.set_ylabel("documents (log)")
    ax.set_title(f"Domain scores of {sc.valid:,} {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def mine(paths: list[Path], domain_texts: list[str], work: Path, mined_path: Path, kept_dir: Path, budget: Budget, *,
         workers: int = 1, tokenizer=None, max_train: int = 20_000, folds: int = 3, seed: int = 1234,
         kept_prefix: str = "general_", png: Path | None = None, progress=None, on_reject=None,
         scorer=None) -> MineResult:
    """Train (cross-fitted) on ``domain_texts`` + a sample of ``paths``, score, select ``budget``, route.

    ``progress(description, total)`` returns an advance callback (as ``pipeline._Progress.task``)."""
    from ellama_recipes.data.classify import train_folds

    task = progress or (lambda d, t: (lambda n=1: None))
    n = count_lines(paths)
    sample = sample_general(paths, max_train, n)
    models = train_folds(domain_texts, sample, folds=folds, seed=seed)
    del sample
    work.mkdir(parents=True, exist_ok=True)
    mpath = models.save(work)
    sc = score_corpus(paths, mpath, work, workers=workers, tokenizer=tokenizer if budget.kind == "tokens" else None,
                      progress=task(f"score ({workers} worker{'s' if workers > 1 else ''})", n), scorer=scorer)
    sel = select(sc, budget)
    res = route(paths, sc, sel, mined_path, kept_dir, kept_prefix=kept_prefix, progress=task("mine", n),
                on_reject=on_reject)
    res.report = {"classifier": models.report, **res.report}
    if png is not None:
        histogram_png(sc, res.report["min_mined_score"], png)
        res.report["histogram_png"] = png.name
    for name in ("scores.f32", "langs.u16", "tokens.u32", "rejects.tmp.jsonl"):
        (work / name).unlink(missing_ok=True)
    return res
