"""Generated corpora with planted near-duplicates, for the dedup tests and ``benchmarks/bench_dedup.py``.

:func:`planted_corpus` returns rows ``{"id", "text", "where"}`` (ids in order) with:

- base documents: synthetic prose (a 6,000-word made-up vocabulary, Zipf-distributed), 6-12 sentences;
- near duplicates of a base document: a few word substitutions / deletions / insertions, or sentences reordered,
  kept only when the word 5-shingle Jaccard to the base is in [0.80, 0.99];
- moderate rewrites: many more edits, kept only when Jaccard <= 0.70 (hard negatives: must NOT be removed);
- boilerplate-heavy look-alikes: one long shop template shared by many pages that differ in a short product part
  (their pairwise Jaccard falls on both sides of the threshold; the brute-force reference decides);
- exact duplicates: a base document with case and punctuation changed (the cleaner's exact key is equal).

:func:`reference_pairs` is the brute-force reference: the exact Jaccard of EVERY pair that shares a shingle
(an inverted index over shingles; all other pairs have Jaccard 0).
"""

from __future__ import annotations

import random
from collections import defaultdict

from ellama_recipes.data.dedup import jaccard, shingle_set

_SYL = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "bi", "da", "fe", "gu", "ho", "ji", "pe", "qu", "ri", "so",
        "tu", "wa", "xe", "yo", "zi", "an", "el", "or", "un", "is"]


def _vocab(rng: random.Random, n: int = 6000) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYL) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class _Gen:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.vocab = _vocab(self.rng)
        cum, acc = [], 0.0
        for i in range(len(self.vocab)):
            acc += 1.0 / (i + 10)
            cum.append(acc)
        self.cum = cum

    def words(self, k: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self.cum, k=k)

    def sentence(self) -> list[str]:
        return self.words(self.rng.randint(8, 20))

    def doc(self, lo: int = 6, hi: int = 12) -> list[list[str]]:
        return [self.sentence() for _ in range(self.rng.randint(lo, hi))]

    def edit(self, doc: list[list[str]], n_edits: int, reorder: bool) -> list[list[str]]:
        d = [list(s) for s in doc]
        if reorder and len(d) > 2:
            i, j = self.rng.sample(range(len(d)), 2)
            d[i], d[j] = d[j], d[i]
        for _ in range(n_edits):
            s = self.rng.randrange(len(d))
            if not d[s]:
                continue
            p = self.rng.randrange(len(d[s]))
            op = self.rng.random()
            if op < 0.6:
                d[s][p] = self.words(1)[0]
            elif op < 0.8 and len(d[s]) > 3:
                del d[s][p]
            else:
                d[s].insert(p, self.words(1)[0])
        return d


def render_doc(doc: list[list[str]]) -> str:
    return " ".join(" ".join(s).capitalize() + "." for s in doc)


def _target(gen: _Gen, base: list[list[str]], lo: float, hi: float, edits: tuple[int, int], reorder_p: float,
            tries: int = 20) -> str | None:
    b = shingle_set(render_doc(base))
    for _ in range(tries):
        cand = gen.edit(base, gen.rng.randint(*edits), gen.rng.random() < reorder_p)
        text = render_doc(cand)
        if lo <= jaccard(b, shingle_set(text)) <= hi:
            return text
    return None


def planted_corpus(n_base: int = 600, seed: int = 0, near_per_base: float = 0.5, rewrites_per_base: float = 0.3,
                   n_templates: int = 6, pages_per_template: int = 25, exact_per_base: float = 0.05) -> list[dict]:
    """A shuffled corpus (see the module docstring); ``where`` is ``planted.jsonl:LINE`` with LINE = id + 1."""
    gen = _Gen(seed)
    texts: list[str] = []
    for _ in range(n_base):
        base = gen.doc()
        texts.append(render_doc(base))
        base_len = sum(len(s) for s in base)
        if gen.rng.random() < near_per_base:
            for _ in range(gen.rng.choice([1, 1, 2])):
                t = _target(gen, base, 0.80, 0.99, (1, max(2, base_len // 25)), 0.5)
                if t:
                    texts.append(t)
        if gen.rng.random() < rewrites_per_base:
            t = _target(gen, base, 0.30, 0.70, (base_len // 10, base_len // 4), 0.7)
            if t:
                texts.append(t)
        if gen.rng.random() < exact_per_base:
            texts.append(render_doc(base).upper().replace(".", "!"))
    for _ in range(n_templates):
        tpl = [gen.sentence() for _ in range(gen.rng.randint(3, 6))]  # shared shop boilerplate
        for _ in range(pages_per_template):
            own = [gen.sentence() for _ in range(gen.rng.randint(1, 4))]
            texts.append(render_doc(own[:1] + tpl + own[1:]))
    order = list(range(len(texts)))
    gen.rng.shuffle(order)
    return [{"id": i, "text": texts[k], "where": f"planted.jsonl:{i + 1}"} for i, k in enumerate(order)]


def reference_pairs(rows: list[dict], n: int = 5, min_jaccard: float = 0.0) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair of ``rows`` (a < b by id) sharing at least one shingle, when >= ``min_jaccard``."""
    sets = {int(r["id"]): shingle_set(r["text"], n) for r in rows}
    post: dict[str, list[int]] = defaultdict(list)
    for i in sorted(sets):
        for s in sets[i]:
            post[s].append(i)
    inter: dict[tuple[int, int], int] = defaultdict(int)
    for ids in post.values():
        if len(ids) > 1:
            for x in range(len(ids)):
                for y in range(x + 1, len(ids)):
                    inter[(ids[x], ids[y])] += 1
    out = {}
    for (a, b), k in inter.items():
        j = k / (len(sets[a]) + len(sets[b]) - k)
        if j >= min_jaccard:
            out[(a, b)] = j
    return out
