"""Stage 3, classify: a small e-commerce domain classifier, used to mine extra domain documents from a general
corpus (the e-Llama recipe's "mine domain data from open text with a trained classifier").

CLI: ``ellama data classify --domain work/serialized/domain.jsonl --general raw/general --out work/classify``

Model: hashed word unigrams + bigrams (crc32 into 2**18 buckets, log-scaled counts, L2-normalised) and a logistic
regression trained by full-batch Adam in numpy. Positives are domain texts, negatives general texts; 20% of each
document is scored out-of-fold (k-fold cross-fitting, see :func:`train_and_evaluate`) to report held-out precision /
recall / F1 at the threshold. General documents whose out-of-fold ``p(domain) >= threshold`` are "mined" and move
to the domain side. Deterministic for a given seed; a few seconds on the bundled sample.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
DIM = 1 << 18


def features(text: str, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Sparse hashed feature vector of ``text``: (indices, values)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = words + [a + " " + b for a, b in zip(words, words[1:])]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    idx = np.fromiter((zlib.crc32(g.encode()) % dim for g in grams), dtype=np.int64, count=len(grams))
    uniq, counts = np.unique(idx, return_counts=True)
    vals = np.log1p(counts).astype(np.float32)
    vals /= np.linalg.norm(vals)
    return uniq, vals


@dataclass
class Batch:
    idx: np.ndarray  # concatenated feature indices
    val: np.ndarray
    row: np.ndarray  # row of each entry
    n: int


def _batch(texts: list[str]) -> Batch:
    fs = [features(t) for t in texts]
    lens = np.array([f[0].size for f in fs], dtype=np.int64)
    idx = np.concatenate([f[0] for f in fs]) if fs else np.zeros(0, np.int64)
    val = np.concatenate([f[1] for f in fs]) if fs else np.zeros(0, np.float32)
    return Batch(idx, val, np.repeat(np.arange(len(fs)), lens), len(fs))


class DomainClassifier:
    def __init__(self, w: np.ndarray | None = None, b: float = 0.0):
        self.w = np.zeros(DIM, np.float32) if w is None else w
        self.b = float(b)

    def _logits(self, bt: Batch) -> np.ndarray:
        z = np.bincount(bt.row, weights=self.w[bt.idx] * bt.val, minlength=bt.n)
        return z + self.b

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return 1.0 / (1.0 + np.exp(-self._logits(_batch(texts))))

    def fit(self, pos: list[str], neg: list[str], epochs: int = 20, lr: float = 0.05, l2: float = 1e-3) -> "DomainClassifier":
        bt = _batch(pos + neg)
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        # class-balanced weights so a 1:5 imbalance does not push everything to "general"
        cw = np.where(y == 1, 0.5 / max(len(pos), 1), 0.5 / max(len(neg), 1))
        m = np.zeros(DIM, np.float64)
        v = np.zeros(DIM, np.float64)
        mb = vb = 0.0
        w = self.w.astype(np.float64)
        for t in range(1, epochs + 1):
            self.w = w
            p = 1.0 / (1.0 + np.exp(-self._logits(bt)))
            g_row = (p - y) * cw
            g = np.bincount(bt.idx, weights=g_row[bt.row] * bt.val, minlength=DIM)
            g += l2 * w
            gb = g_row.sum()
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
            mb = 0.9 * mb + 0.1 * gb
            vb = 0.999 * vb + 0.001 * gb * gb
            self.b -= lr * (mb / (1 - 0.9 ** t)) / (np.sqrt(vb / (1 - 0.999 ** t)) + 1e-8)
        self.w = w.astype(np.float32)
        return self

    def save(self, path: Path) -> None:
        nz = np.nonzero(self.w)[0]
        np.savez_compressed(path, idx=nz, val=self.w[nz], b=np.array([self.b]), dim=np.array([DIM]))

    @classmethod
    def load(cls, path: Path) -> "DomainClassifier":
        d = np.load(path)
        w = np.zeros(int(d["dim"][0]), np.float32)
        w[d["idx"]] = d["val"]
        return cls(w, float(d["b"][0]))


def precision_recall(p: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "threshold": threshold,
            "held_out_domain": int(np.sum(y == 1)), "held_out_general": int(np.sum(y == 0))}


def train_and_evaluate(domain_texts: list[str], general_texts: list[str], threshold: float = 0.5, seed: int = 1234,
                       folds: int = 3, epochs: int = 20) -> tuple[DomainClassifier, dict, np.ndarray]:
    """Cross-fitted training: every document is scored by a model that did not see it.

    Both sides are split into ``folds`` seeded folds; for each fold a model is trained on the other folds and scores
    the fold. Precision/recall/F1 are computed on these out-of-fold scores (every document is held out once). The
    general side's out-of-fold scores are what mining uses, so a shopping-flavoured document that sits in the
    general corpus is judged by a model that was not told it is "general". A final model trained on everything is
    returned for applying to other corpora.

    Returns ``(final_model, report, general_out_of_fold_probabilities)``.
    """
    from ellama_recipes.errors import UserError

    if len(domain_texts) < folds * 2 or len(general_texts) < folds * 2:
        raise UserError(f"The domain classifier needs at least {folds * 2} domain and {folds * 2} general documents; "
                        f"got {len(domain_texts)} and {len(general_texts)}. Pass more data with --domain/--general.")
    rng = np.random.default_rng(seed)
    d_fold = rng.permutation(len(domain_texts)) % folds
    g_fold = rng.permutation(len(general_texts)) % folds
    d_p = np.zeros(len(domain_texts))
    g_p = np.zeros(len(general_texts))
    for k in range(folds):
        clf = DomainClassifier().fit([t for t, f in zip(domain_texts, d_fold) if f != k],
                                     [t for t, f in zip(general_texts, g_fold) if f != k], epochs=epochs)
        d_idx = np.nonzero(d_fold == k)[0]
        g_idx = np.nonzero(g_fold == k)[0]
        d_p[d_idx] = clf.predict_proba([domain_texts[i] for i in d_idx])
        g_p[g_idx] = clf.predict_proba([general_texts[i] for i in g_idx])
    y = np.concatenate([np.ones(len(d_p)), np.zeros(len(g_p))])
    report = precision_recall(np.concatenate([d_p, g_p]), y, threshold)
    report["folds"] = folds
    report["mined"] = int(np.sum(g_p >= threshold))
    final = DomainClassifier().fit(domain_texts, general_texts, epochs=epochs)
    return final, report, g_p


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
