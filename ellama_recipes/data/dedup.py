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
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:  # pragma: no cover
    import ray.data

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
#
# Shuffles (each a Ray Data groupby, sort-based by default, ``num_partitions`` partitions; blocks spill to disk):
#   G1  rows (band, gkey, id, xkey, where): band -1 = the exact key, 0..bands-1 = LSH band keys -> exact drops and
#       candidate pairs (within a bucket, exact duplicates are reduced to their survivor: they share every band)
#   V1  candidates + documents grouped by the pair's first id  -> candidates carrying text_a
#   V2  those + documents grouped by the pair's second id      -> verified edges (exact Jaccard >= threshold)
#   A   edges grouped by node                                   -> node state (label, neighbours, their Jaccard)
#   LP  one groupby per label-propagation round (messages to neighbours + the node's state), until no label changes
#   R   node states grouped by label (= cluster)                -> drops, by the rule of step 5
# The driver only counts rows (``changed`` per round); it never holds documents, pairs or edges.

def _schema(kind: str):
    import pyarrow as pa

    return {
        "out": pa.schema([("id", pa.int64()), ("rep_id", pa.int64()), ("reason", pa.string()),
                          ("jaccard", pa.float64()), ("rep_where", pa.string())]),
        "g1": pa.schema([("kind", pa.int8()), ("a", pa.int64()), ("b", pa.int64()), ("where", pa.string())]),
        "v": pa.schema([("k", pa.int64()), ("other", pa.int64()), ("text", pa.string()), ("where", pa.string()),
                        ("doc", pa.bool_())]),
        "edge": pa.schema([("a", pa.int64()), ("b", pa.int64()), ("jaccard", pa.float64()), ("where_a", pa.string()),
                           ("where_b", pa.string())]),
        "state": pa.schema([("node", pa.int64()), ("label", pa.int64()), ("where", pa.string()),
                            ("nbrs", pa.binary()), ("jacs", pa.binary()), ("changed", pa.bool_()),
                            ("msg", pa.bool_())]),
    }[kind]


def _table(kind: str, cols: dict):
    import pyarrow as pa

    sch = _schema(kind)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in sch}, schema=sch)


def _num_partitions(n_docs: int, docs_per_partition: int) -> int:
    """Shuffle partitions: enough that one holds about ``docs_per_partition`` documents' rows (so the memory of a
    reduce task does not grow with the corpus), at least twice the cluster's CPUs, at most 10,000."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(2, 2 * cpus, min(10_000, -(-n_docs // max(1, docs_per_partition))))


def find_duplicates(ds: "ray.data.Dataset", cfg: DedupConfig = DedupConfig(), num_partitions: int | None = None,
                    shuffle: str = "sort", docs_per_partition: int = 50_000) -> "ray.data.Dataset":
    """Input rows: ``{"id": int64 (global order; smaller = earlier = preferred representative), "text": str,
    "where": str ("file:line")}``. Output rows, ONLY for the documents to drop: ``{"id", "rep_id" (the kept
    document it duplicates: the smallest id of its exact-duplicate group; for near duplicates the smallest kept
    document of its cluster it has a verified pair with -- the cluster's smallest id unless the cluster chains),
    "reason" ("exact_duplicate" | "near_duplicate"), "jaccard" (exact word-5-shingle Jaccard of (id, rep_id), 1.0
    for exact), "rep_where"}``.

    Exact dedup by the cleaner's content key through a groupby (shuffle); near dedup: MinHash signatures in
    parallel (``map_batches``), LSH bands exploded and grouped by band key (shuffle, spills to disk, never one
    in-memory index), candidate pairs verified by EXACT word-5-shingle Jaccard >= threshold, clusters by a
    distributed connected-components pass (label propagation through groupbys, iterated until no label changes;
    nothing collected on the driver), and inside each cluster the rule of the module docstring (step 5): a
    document is dropped only if it has a verified pair (exact Jaccard >= threshold) with a kept document of its
    cluster; the smallest id of every cluster is kept. Deterministic. Returns a materialized dataset.
    ``num_partitions``: partitions of every shuffle (default: one per ``docs_per_partition`` documents, at least
    twice the cluster's CPUs; the document count is read off the materialized band rows). ``shuffle``: the
    Ray Data shuffle used by the groupbys while this runs: ``"sort"`` (task-based pull shuffle, the default: 10-20x
    faster than the actor-based hash shuffle on small inputs, measured on a 2-CPU machine) or ``"hash"`` (Ray's
    default ``SHUFFLE_V2``, aggregator actors). The input dataset's context gets its strategy back afterwards.
    """
    from ray.data.context import ShuffleStrategy

    ctx = ds.context
    saved = ctx.shuffle_strategy
    strategies = {"sort": ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, "hash": ShuffleStrategy.SHUFFLE_V2}
    if shuffle not in strategies:
        raise ValueError(f"shuffle={shuffle!r}: use 'sort' or 'hash'")
    ctx.shuffle_strategy = strategies[shuffle]
    try:
        return _find_duplicates(ds, cfg, num_partitions, docs_per_partition)
    finally:
        ctx.shuffle_strategy = saved


def _find_duplicates(ds, cfg: DedupConfig, P: int | None, docs_per_partition: int):
    docs = ds.select_columns(["id", "text", "where"])

    def explode(batch):
        ids = np.asarray(batch["id"], dtype=np.int64)
        texts = list(batch["text"])
        where = np.asarray(batch["where"], dtype=object)
        xk = np.array([exact_key(t) for t in texts], dtype=np.int64)
        n = len(ids)
        cols = {"band": [np.full(n, -1, np.int16)], "gkey": [xk], "id": [ids], "xkey": [xk], "where": [where]}
        if cfg.near and n:
            bk = band_keys(signatures(texts, cfg), cfg)  # (n, bands)
            cols["band"].append(np.tile(np.arange(cfg.bands, dtype=np.int16), n))
            cols["gkey"].append(bk.reshape(-1))
            cols["id"].append(np.repeat(ids, cfg.bands))
            cols["xkey"].append(np.repeat(xk, cfg.bands))
            cols["where"].append(np.repeat(where, cfg.bands))
        return {k: np.concatenate(v) for k, v in cols.items()}

    def g1(g):
        ids = np.asarray(g["id"], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        where = np.asarray(g["where"], dtype=object)[order]
        if int(g["band"][0]) < 0:  # one exact-key group: the smallest id stays
            n = len(ids) - 1
            return _table("g1", {"kind": [0] * n, "a": [int(ids[0])] * n, "b": ids[1:].tolist(),
                                 "where": [where[0]] * n})
        xk = np.asarray(g["xkey"], dtype=np.int64)[order]
        seen, members = set(), []
        for i, x in zip(ids.tolist(), xk.tolist()):  # exact duplicates share every band: keep their survivor
            if x not in seen:
                seen.add(x)
                members.append(i)
        prs = bucket_pairs(members, cfg.bucket_cap)
        return _table("g1", {"kind": [1] * len(prs), "a": [p[0] for p in prs], "b": [p[1] for p in prs],
                             "where": [""] * len(prs)})

    rows = docs.map_batches(explode, batch_format="numpy").materialize()  # object store; spills to disk
    if P is None:
        P = _num_partitions(rows.count() // (1 + (cfg.bands if cfg.near else 0)), docs_per_partition)
    grouped = rows.groupby(["band", "gkey"], num_partitions=P).map_groups(g1, batch_format="numpy").materialize()
    del rows

    def exact_out(b):
        n = len(b["a"])
        return _table("out", {"id": b["b"], "rep_id": b["a"], "reason": [EXACT_DUPLICATE] * n,
                              "jaccard": [1.0] * n, "rep_where": b["where"]})

    out = grouped.filter(expr="kind == 0").map_batches(exact_out, batch_format="numpy")
    if cfg.near:
        near = _near(grouped.filter(expr="kind == 1"), docs, cfg, P)
        if near is not None:
            out = out.union(near)
    out = out.materialize()
    if out.count() == 0:  # keep the output schema even when nothing is dropped
        import ray.data

        return ray.data.from_arrow(_schema("out").empty_table()).materialize()
    return out


def _near(cands, docs, cfg: DedupConfig, P: int):
    """Near-duplicate drops from the candidate pairs ``cands`` (a < b); None when no pair verifies."""
    if cands.count() == 0:
        return None

    def as_v_pairs(b):
        n = len(b["a"])
        return _table("v", {"k": b["a"], "other": b["b"], "text": [""] * n, "where": [""] * n, "doc": [False] * n})

    def as_v_docs(b):
        n = len(b["id"])
        return _table("v", {"k": b["id"], "other": [-1] * n, "text": b["text"], "where": b["where"], "doc": [True] * n})

    vdocs = docs.map_batches(as_v_docs, batch_format="numpy")

    def v1(g):  # group of document a: its text onto each (distinct) pair (a, b), re-keyed by b
        isdoc = np.asarray(g["doc"], dtype=bool)
        others = sorted(set(np.asarray(g["other"], dtype=np.int64)[~isdoc].tolist()))
        if not others or not isdoc.any():
            return _table("v", {"k": [], "other": [], "text": [], "where": [], "doc": []})
        d = int(np.flatnonzero(isdoc)[0])
        a, text, where = int(g["k"][d]), g["text"][d], g["where"][d]
        n = len(others)
        return _table("v", {"k": others, "other": [a] * n, "text": [text] * n, "where": [where] * n,
                            "doc": [False] * n})

    def v2(g):  # group of document b: exact Jaccard with every candidate a
        isdoc = np.asarray(g["doc"], dtype=bool)
        empty = {"a": [], "b": [], "jaccard": [], "where_a": [], "where_b": []}
        if isdoc.all() or not isdoc.any():
            return _table("edge", empty)
        d = int(np.flatnonzero(isdoc)[0])
        b, sb, wb = int(g["k"][d]), shingle_set(g["text"][d], cfg.shingle), g["where"][d]
        cols = empty
        for i in np.flatnonzero(~isdoc).tolist():
            j = jaccard(shingle_set(g["text"][i], cfg.shingle), sb)
            if j >= cfg.threshold:
                cols["a"].append(int(g["other"][i]))
                cols["b"].append(b)
                cols["jaccard"].append(j)
                cols["where_a"].append(g["where"][i])
                cols["where_b"].append(wb)
        return _table("edge", cols)

    with_a = (cands.map_batches(as_v_pairs, batch_format="numpy").union(vdocs)
              .groupby("k", num_partitions=P).map_groups(v1, batch_format="numpy"))
    edges = (with_a.union(vdocs).groupby("k", num_partitions=P).map_groups(v2, batch_format="numpy")
             .materialize())
    if edges.count() == 0:
        return None
    state = label_propagation(edges, P)

    def resolve(g):
        es, where = [], {}
        for v, w, nb, jb in zip(np.asarray(g["node"]).tolist(), g["where"], g["nbrs"], g["jacs"]):
            where[v] = w
            for u, j in zip(np.frombuffer(nb, np.int64).tolist(), np.frombuffer(jb, np.float64).tolist()):
                if v < u:
                    es.append((v, u, j))
        d = resolve_cluster(es)
        n = len(d)
        return _table("out", {"id": [x[0] for x in d], "rep_id": [x[1] for x in d], "reason": [NEAR_DUPLICATE] * n,
                              "jaccard": [x[2] for x in d], "rep_where": [where[x[1]] for x in d]})

    return state.groupby("label", num_partitions=P).map_groups(resolve, batch_format="numpy")


def label_propagation(edges, P: int = 8, max_rounds: int = 10_000):
    """Connected components of the undirected ``edges`` (a, b, jaccard, where_a, where_b) by label propagation: a
    materialized dataset of node states ``(node, label, where, nbrs, jacs)`` where ``label`` is the smallest node id
    of the node's component and ``nbrs``/``jacs`` its neighbours and their Jaccard (int64/float64 bytes).

    Each round is ONE groupby by node over the node states and the messages every node sends its neighbours (its
    label); a node's new label is the minimum it received, and the round reports how many labels changed; rounds
    repeat until none did (at most the component diameter + 1)."""

    def both_ways(b):
        a, bb = np.asarray(b["a"], np.int64), np.asarray(b["b"], np.int64)
        j = np.asarray(b["jaccard"], np.float64)
        return {"node": np.concatenate([a, bb]), "nbr": np.concatenate([bb, a]), "jaccard": np.concatenate([j, j]),
                "where": np.concatenate([np.asarray(b["where_a"], object), np.asarray(b["where_b"], object)])}

    def init(g):
        nb = np.asarray(g["nbr"], np.int64)
        order = np.argsort(nb, kind="stable")
        v = int(g["node"][0])
        nb, jac = nb[order], np.asarray(g["jaccard"], np.float64)[order]
        return _table("state", {"node": [v], "label": [min(v, int(nb[0]))], "where": [g["where"][0]],
                                "nbrs": [nb.tobytes()], "jacs": [jac.tobytes()], "changed": [True], "msg": [False]})

    state = (edges.map_batches(both_ways, batch_format="numpy").groupby("node", num_partitions=P)
             .map_groups(init, batch_format="numpy").materialize())

    def send(b):
        import pyarrow as pa

        t = pa.Table.from_pydict({k: b[k] for k in b}, schema=_schema("state"))
        msgs = {"node": [], "label": []}
        for nb, lab in zip(b["nbrs"], np.asarray(b["label"]).tolist()):
            us = np.frombuffer(nb, np.int64).tolist()
            msgs["node"].extend(us)
            msgs["label"].extend([lab] * len(us))
        n = len(msgs["node"])
        m = _table("state", {**msgs, "where": [""] * n, "nbrs": [b""] * n, "jacs": [b""] * n, "changed": [False] * n,
                             "msg": [True] * n})
        return pa.concat_tables([t, m])

    def update(g):
        ismsg = np.asarray(g["msg"], dtype=bool)
        s = int(np.flatnonzero(~ismsg)[0])
        old = int(g["label"][s])
        new = min(old, int(np.min(np.asarray(g["label"], np.int64))))
        return _table("state", {"node": [int(g["node"][s])], "label": [new], "where": [g["where"][s]],
                                "nbrs": [g["nbrs"][s]], "jacs": [g["jacs"][s]], "changed": [new != old],
                                "msg": [False]})

    for _ in range(max_rounds):
        state = (state.map_batches(send, batch_format="numpy").groupby("node", num_partitions=P)
                 .map_groups(update, batch_format="numpy").materialize())
        if state.filter(expr="changed").count() == 0:
            return state
    raise RuntimeError(f"label propagation did not converge in {max_rounds} rounds")
