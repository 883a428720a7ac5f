"""Exact and near-duplicate detection that scales past one machine (Ray Data), and the same thing in-process.

Both entry points take rows ``{"id": int (global order: smaller = earlier = preferred), "text": str (the cleaned
text, i.e. what :func:`ellama_recipes.data.clean.clean` dedups on), "where": "file:line"}`` and return ONLY the rows
to drop: ``{"id", "rep_id", "reason", "jaccard", "rep_where"}``.

Method
------
1. **Exact**: the cleaner's content key (:func:`_dedup_key`, used by data/clean.py: lower-cased words, blake2b-64).
   Per key the smallest id is kept; every other document is an ``exact_duplicate`` of it (``jaccard`` 1.0).
   On Ray: a groupby (hash shuffle) over ``(key, id, where)`` only -- the text never travels through that shuffle.
2. **Candidates**: MinHash over the word 5-shingles (:func:`shingle_set`, the cleaner's shingles),
   ``num_perm`` = 64 hash functions (splitmix64 of the shingle hash xor a per-function seed), computed per batch in
   parallel (``map_batches``). LSH with ``bands`` x ``rows`` = 16 x 4: a pair with Jaccard ``s`` becomes a candidate
   with probability ``1 - (1 - s**4)**16``: 0.9998 at s = 0.8, 0.998 at 0.75, 0.988 at 0.7, 0.64 at 0.5. The band
   table is tuned far BELOW the threshold (its S-curve midpoint is ``(1/16)**(1/4)`` = 0.5), so pairs near 0.8 are
   not missed; the extra candidates cost one exact check each. (datasketch's ``MinHashLSH(threshold=0.8,
   num_perm=64)`` picks its bands AT the threshold and misses about a quarter of the pairs at 0.80-0.99.)
   On Ray the band keys are exploded into rows ``(bkey, id)`` and grouped by ``bkey`` (a shuffle that spills to
   disk; no in-memory index). A bucket of ``m`` documents gives all pairs when ``m <= bucket_cap`` and otherwise
   each document paired with the ``bucket_cap/2`` smallest ids and its ``bucket_cap/2`` predecessors (bounded
   work for boilerplate buckets).
3. **Verification**: every candidate pair is checked with the EXACT Jaccard of the two 5-shingle sets; pairs with
   Jaccard >= ``threshold`` are edges. Nothing is dropped on a MinHash estimate.
4. **Clusters**: connected components of the edges by label propagation (each node takes the smallest label among
   itself and its neighbours, one groupby per round, iterated until no label changes). Memory per node is bounded by
   the blocks being shuffled, never by the whole edge list; nothing is collected on the driver.
5. **Decision inside a cluster** (the rule): the documents of a cluster are visited in id order; a document is
   KEPT unless it has a verified edge (exact Jaccard >= threshold) to an already kept document of its cluster, in
   which case it is dropped as a ``near_duplicate`` with ``rep_id`` = the smallest such kept document and
   ``jaccard`` = their exact Jaccard. The cluster's smallest id is always kept. This is the old sequential
   cleaner's rule ("similar to an already kept document") restricted to verified pairs: in a chain A~B~C where
   J(A, C) < threshold, A is kept, B dropped (duplicate of A) and C kept (its only similar document, B, is gone).
   Every drop is therefore a verified pair >= threshold with a kept document, and no two kept documents form a
   verified pair. Memory of this step: one cluster's edges (clusters are groups of look-alikes, not the corpus).

Everything is deterministic: the result depends only on the set of rows (ids, texts), not on their order, the
number of blocks or workers.

Layout: this module holds the configuration (:class:`DedupConfig`), the pure-Python pieces (keys, shingles, MinHash,
LSH bands, bucket pairs, the rule of step 5), the streaming :class:`NearDup` and :func:`find_duplicates_local`; the
Ray Data implementation (:func:`find_duplicates`, :func:`label_propagation`) lives in data/dedup_ray.py and is
re-exported from here.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
import numpy as np

OUTPUT_COLUMNS = ("id", "rep_id", "reason", "jaccard", "rep_where")
# The reject reasons (re-exported by data/clean.py, which uses this module's key, shingles and NearDup).
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
_WORD = re.compile(r"\w+", re.UNICODE)


def _dedup_key(text: str) -> bytes:
    """The exact-duplicate key (the cleaner's): blake2b-64 of the lower-cased words."""
    return hashlib.blake2b(" ".join(_WORD.findall(text.lower())).encode(), digest_size=8).digest()


def _shingles(text: str, n: int = 5) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.8  # word 5-shingle Jaccard >= threshold => near duplicate
    num_perm: int = 64
    bands: int = 16  # LSH tuned BELOW the threshold for candidates: P(candidate | s) = 1 - (1 - s**rows)**bands
    rows: int = 4
    seed: int = 1
    shingle: int = 5
    bucket_cap: int = 64  # a bucket bigger than this pairs each member with bucket_cap documents, not all
    near: bool = True  # False: exact dedup only

    def __post_init__(self):
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} > num_perm = {self.num_perm}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold {self.threshold} not in (0, 1]")

    def candidate_probability(self, s: float) -> float:
        """Probability that a pair with Jaccard ``s`` shares at least one LSH band."""
        return 1.0 - (1.0 - s ** self.rows) ** self.bands


# ---------------------------------------------------------------------------------------------------- hashing

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLD
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)


def _perm_seeds(cfg: DedupConfig) -> np.ndarray:
    return _mix(np.arange(cfg.num_perm, dtype=np.uint64) + np.uint64(cfg.seed) * np.uint64(1_000_003))


def shingle_set(text: str, n: int = 5) -> set[str]:
    """The word n-shingles of ``text`` (lower-cased ``\\w+`` words; one shingle of all words when fewer than n),
    the same shingles as the cleaner's ``_shingles``."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _shingle_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the distinct word n-shingles of ``text`` (blake2b of each shingle)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                        for s in shingle_set(text, n)), dtype=np.uint64)


def signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), uint64."""
    seeds = _perm_seeds(cfg)
    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint64)
    for i, t in enumerate(texts):
        h = _shingle_hashes(t, cfg.shingle)
        out[i] = _mix(h[:, None] ^ seeds[None, :]).min(axis=0)
    return out


def band_keys(sig: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """One int64 key per (document, band): a hash of the band's ``rows`` signature values and the band index."""
    n = sig.shape[0]
    b = sig[:, : cfg.bands * cfg.rows].reshape(n, cfg.bands, cfg.rows)
    h = _mix(np.arange(cfg.bands, dtype=np.uint64)[None, :] + np.uint64(0x5BD1E995)) * np.ones((n, 1), np.uint64)
    for r in range(cfg.rows):
        h = _mix(h ^ b[:, :, r])
    return h.view(np.int64)


def exact_key(text: str) -> int:
    """The cleaner's exact-duplicate key as a signed 64-bit int."""
    return int.from_bytes(_dedup_key(text), "little", signed=True)


def bucket_pairs(ids: list[int], cap: int) -> list[tuple[int, int]]:
    """Candidate pairs (a < b) of one LSH bucket (``ids`` sorted ascending, distinct)."""
    m = len(ids)
    if m < 2:
        return []
    if m <= cap:
        return [(ids[i], ids[j]) for j in range(1, m) for i in range(j)]
    half = max(1, cap // 2)
    out = []
    for j in range(1, m):
        partners = set(ids[:min(half, j)]) | set(ids[max(0, j - half):j])
        out.extend((a, ids[j]) for a in sorted(partners))
    return out


def resolve_cluster(edges: Iterable[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """The rule (module docstring, step 5) for one cluster: ``[(dropped id, kept rep id, jaccard)]``."""
    adj: dict[int, dict[int, float]] = defaultdict(dict)
    for a, b, j in edges:
        adj[a][b] = j
        adj[b][a] = j
    kept: set[int] = set()
    drops = []
    for v in sorted(adj):
        linked = [u for u in adj[v] if u in kept]
        if linked:
            u = min(linked)
            drops.append((v, u, adj[v][u]))
        else:
            kept.add(v)
    return drops


class NearDup:
    """Streaming near-duplicate check for the in-process cleaner: word 5-shingle Jaccard >= ``threshold`` with an
    already KEPT document, verified exactly (issue 19).

    Candidates come from the same MinHash LSH as this module (``num_perm`` values, 16 bands x 4
    rows, tuned below the threshold), and each candidate is checked with the exact Jaccard of the two shingle sets
    (64-bit hashed shingles), so nothing is rejected on an estimate and pairs near the threshold are not missed.
    (The old datasketch ``MinHashLSH(threshold=0.8)`` caught ~75 % of the pairs at 0.80-0.99 and also rejected
    look-alikes below it: ``benchmarks/bench_dedup.py``.) Memory: the band table plus every kept document's shingle
    hashes (8 bytes per word), i.e. one process; for corpora past one machine use
    :func:`find_duplicates` on Ray Data. The decisions equal :func:`find_duplicates_local` on the same documents in
    the same order (as long as no LSH bucket holds more than ``bucket_cap`` documents; the streaming index checks
    every kept document of a bucket).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, seed: int = 1):
        bands, rows = (16, 4) if num_perm >= 64 else (max(1, num_perm // 4), 4)
        self.cfg = DedupConfig(threshold=threshold, num_perm=num_perm, seed=seed, bands=bands, rows=rows)
        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        self._buckets: dict[int, list[int]] = {}
        self._sh: list = []
        self._keys: list = []
        self.last_match: tuple[object, float] | None = None  # (key of the kept document, exact Jaccard)

    def seen(self, text: str, key: object = None) -> bool:
        """True if ``text`` has exact Jaccard >= threshold with a kept document (then :attr:`last_match` says
        which); otherwise keep (index) it under ``key`` and return False."""
        sh = np.unique(_shingle_hashes(text, self.cfg.shingle))
        bks = band_keys(signatures([text], self.cfg), self.cfg)[0].tolist()
        cands = sorted({i for k in bks for i in self._buckets.get(k, ())})
        for i in cands:  # smallest (earliest) kept document first, as find_duplicates_local
            other = self._sh[i]
            inter = len(np.intersect1d(sh, other, assume_unique=True))
            j = inter / (len(sh) + len(other) - inter)
            if j >= self.threshold:
                self.last_match = (self._keys[i], j)
                return True
        n = len(self._sh)
        self._sh.append(sh)
        self._keys.append(n if key is None else key)
        for k in bks:
            self._buckets.setdefault(k, []).append(n)
        self.last_match = None
        return False


# ---------------------------------------------------------------------------------------------------- in-process

def find_duplicates_local(rows: Iterable[dict], cfg: DedupConfig = DedupConfig()) -> list[dict]:
    """Same contract as :func:`find_duplicates`, in-process, no Ray (tiny inputs, the tests' reference, and the
    ``--executor inprocess`` path). Memory: all signatures and band keys of the input (linear in documents)."""
    rows = sorted(rows, key=lambda r: int(r["id"]))
    drops: list[dict] = []
    first: dict[int, dict] = {}
    survivors: list[dict] = []
    for r in rows:
        k = exact_key(r["text"])
        rep = first.get(k)
        if rep is None:
            first[k] = r
            survivors.append(r)
        else:
            drops.append({"id": int(r["id"]), "rep_id": int(rep["id"]), "reason": EXACT_DUPLICATE, "jaccard": 1.0,
                          "rep_where": rep["where"]})
    if cfg.near and len(survivors) > 1:
        by_id = {int(r["id"]): r for r in survivors}
        keys = band_keys(signatures([r["text"] for r in survivors], cfg), cfg)
        buckets: dict[int, list[int]] = defaultdict(list)
        for r, ks in zip(survivors, keys.tolist()):
            for k in ks:
                buckets[k].append(int(r["id"]))  # appended in id order
        cands: set[tuple[int, int]] = set()
        for ids in buckets.values():
            if len(ids) > 1:
                cands.update(bucket_pairs(ids, cfg.bucket_cap))
        shingles: dict[int, set[str]] = {}

        def sh(i: int) -> set[str]:
            s = shingles.get(i)
            if s is None:
                s = shingles[i] = shingle_set(by_id[i]["text"], cfg.shingle)
            return s

        edges = []
        for a, b in sorted(cands):
            j = jaccard(sh(a), sh(b))
            if j >= cfg.threshold:
                edges.append((a, b, j))
        # connected components (union-find; the Ray path uses label propagation for the same labels)
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b, _ in edges:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        clusters: dict[int, list] = defaultdict(list)
        for e in edges:
            clusters[find(e[0])].append(e)
        for label in sorted(clusters):
            for v, u, j in resolve_cluster(clusters[label]):
                drops.append({"id": v, "rep_id": u, "reason": NEAR_DUPLICATE, "jaccard": float(j),
                              "rep_where": by_id[u]["where"]})
    drops.sort(key=lambda d: d["id"])
    return drops


# ---------------------------------------------------------------------------------------------------- Ray Data
# The Ray Data implementation (find_duplicates, label_propagation and their shuffles) lives in data/dedup_ray.py,
# which imports this module; the names are re-exported here lazily (no import circle, no Ray import on load).
_RAY_NAMES = ("find_duplicates", "label_propagation")


def __getattr__(name: str):
    if name in _RAY_NAMES:
        from ellama_recipes.data import dedup_ray

        return getattr(dedup_ray, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
