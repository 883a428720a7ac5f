"""Stage 3, classify: a small e-commerce domain classifier, used to mine extra domain documents from a general
corpus (the e-Llama recipe's "mine domain data from open text with a trained classifier").

CLI: ``ellama data classify --domain work/serialized/domain.jsonl --general raw/general --out work/classify
--mine-fraction 0.05``

Model (scikit-learn, chosen over fastText by ``benchmarks/bench_mining.py`` on a planted test; numbers in the
README): :class:`~sklearn.feature_extraction.text.HashingVectorizer` (lower-cased word unigrams + bigrams, 2**20
buckets, L2-normalised counts; stateless, so a model is the fitted estimator alone) and
:class:`~sklearn.naive_bayes.MultinomialNB` (alpha 1, uniform class prior). The *score* of a document is the
model's log-odds ``log p(domain|x) - log p(general|x)``: it ranks documents, which is what mining by budget needs;
``p(domain)`` is its logistic. Multinomial naive Bayes weighs every word by how much more often it occurs in domain
text, so e-commerce prose (orders, parcels, returns) ranks high even though the classifier is trained on catalog
records; discriminative models (logistic regression, SGD) put their weight on the record format ("Product:",
"Category:") that separates the training sets and rank prose lower (see the benchmark).

Cross-fitting: general documents are split into ``folds`` by a hash of their position (:func:`fold_of`) and domain
documents by a seeded permutation. Model ``k`` is trained on everything outside fold ``k``; every general document
is scored by the model of its fold (documents outside the training sample as well), so no document is judged by a model that was
told it is "general". Held-out precision/recall on domain-vs-general (the easy task: catalog records against open
text) is reported from the out-of-fold scores; it says little about finding domain *prose*, which is what the
planted test measures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

N_FEATURES = 1 << 20
MODEL_FILE = "classifier.joblib"


def _vectorizer():
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=N_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm="l2",
                             lowercase=True, dtype=np.float32)


class DomainClassifier:
    """HashingVectorizer + MultinomialNB; :meth:`score` is the log-odds of domain vs general."""

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha
        self.nb = None
        self._vec = _vectorizer()
        self._w: np.ndarray | None = None
        self._b = 0.0

    def fit(self, pos: list[str], neg: list[str]) -> "DomainClassifier":
        from sklearn.naive_bayes import MultinomialNB

        x = self._vec.transform(list(pos) + list(neg))
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        self.nb = MultinomialNB(alpha=self.alpha, fit_prior=False).fit(x, y)
        self._linear()
        return self

    def _linear(self) -> None:
        # MultinomialNB is linear in the features: log-odds = x . (log P(w|domain) - log P(w|general)) + prior term
        flp = self.nb.feature_log_prob_
        self._w = (flp[1] - flp[0]).astype(np.float32)
        self._b = float(self.nb.class_log_prior_[1] - self.nb.class_log_prior_[0])

    def score(self, texts: list[str]) -> np.ndarray:
        """Log-odds of domain for each text (float32)."""
        if not texts:
            return np.zeros(0, np.float32)
        x = self._vec.transform(texts)
        return (x @ self._w + self._b).astype(np.float32)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return sigmoid(self.score(texts))

    def __getstate__(self):
        return {"alpha": self.alpha, "nb": self.nb}

    def __setstate__(self, st):
        self.__init__(st["alpha"])
        self.nb = st["nb"]
        self._linear()


def fold_of(corpus_index, folds: int) -> np.ndarray:
    """Fold of general documents by corpus position: a fixed 64-bit mix (splitmix64) of the index, mod ``folds``.
    A hash rather than ``index % folds`` so an evenly strided training sample still covers every fold."""
    x = np.asarray(corpus_index, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(folds)).astype(np.int64)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -60, 60)))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class FoldModels:
    """The ``folds`` cross-fitted models; general document ``i`` is scored by ``models[fold_of(i)]``."""

    models: list[DomainClassifier]
    report: dict = field(default_factory=dict)

    @property
    def folds(self) -> int:
        return len(self.models)

    def score_at(self, texts: list[str], corpus_index: np.ndarray) -> np.ndarray:
        """Scores of general documents at positions ``corpus_index``, each by the model of its fold."""
        fold = fold_of(corpus_index, self.folds)
        out = np.empty(len(texts), np.float32)
        for k, m in enumerate(self.models):
            sel = np.nonzero(fold == k)[0]
            if sel.size:
                out[sel] = m.score([texts[i] for i in sel])
        return out

    def save(self, folder: Path) -> Path:
        import joblib

        path = Path(folder) / MODEL_FILE
        joblib.dump({"format": "ellama-domain-classifier/1", "models": self.models, "report": self.report}, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "FoldModels":
        import joblib

        d = joblib.load(path)
        return cls(d["models"], d.get("report", {}))


def precision_recall(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    pred = scores >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
            "held_out_domain": int(np.sum(y == 1)), "held_out_general": int(np.sum(y == 0))}


def train_folds(domain_texts: list[str], general_sample: list[tuple[int, str]], *, folds: int = 3,
                seed: int = 1234) -> FoldModels:
    """Train the cross-fitted models on domain texts and a sample of the general corpus.

    ``general_sample`` holds ``(index_in_corpus, text)`` pairs; a general document's fold is ``fold_of(index)``.
    The report holds out-of-fold precision/recall of domain-vs-general at p(domain) >= 0.5 (the easy task).
    """
    from ellama_recipes.errors import UserError

    if len(domain_texts) < folds * 2 or len(general_sample) < folds * 2:
        raise UserError(f"The domain classifier needs at least {folds * 2} domain and {folds * 2} general documents; "
                        f"got {len(domain_texts)} and {len(general_sample)}. Pass more data with --domain/--general.")
    rng = np.random.default_rng(seed)
    d_fold = rng.permutation(len(domain_texts)) % folds
    g_fold = fold_of([i for i, _ in general_sample], folds)
    g_texts = [t for _, t in general_sample]
    d_s = np.zeros(len(domain_texts), np.float32)
    g_s = np.zeros(len(g_texts), np.float32)
    models = []
    for k in range(folds):
        m = DomainClassifier().fit([t for t, f in zip(domain_texts, d_fold) if f != k],
                                   [t for t, f in zip(g_texts, g_fold) if f != k])
        d_idx, g_idx = np.nonzero(d_fold == k)[0], np.nonzero(g_fold == k)[0]
        d_s[d_idx] = m.score([domain_texts[i] for i in d_idx])
        g_s[g_idx] = m.score([g_texts[i] for i in g_idx])
        models.append(m)
    y = np.concatenate([np.ones(len(d_s)), np.zeros(len(g_s))])
    report = {"model": "sklearn HashingVectorizer(1-2 grams, 2**20) + MultinomialNB(alpha=1)", "folds": folds,
              "trained_on": {"domain": len(domain_texts), "general_sample": len(g_texts)},
              "held_out_domain_vs_general": {**precision_recall(np.concatenate([d_s, g_s]), y, 0.0),
                                             "at": "p(domain) >= 0.5"}}
    return FoldModels(models, report)


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
