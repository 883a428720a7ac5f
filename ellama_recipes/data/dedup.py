"""Exact and near-duplicate detection that scales past one machine (Ray Data), and the same thing in-process.

Both entry points take rows ``{"id": int (global order: smaller = earlier = preferred), "text": str (the cleaned
text, i.e. what :func:`ellama_recipes.data.clean.clean` dedups on), "where": "file:line"}`` and return ONLY the rows
to drop: ``{"id", "rep_id", "reason", "jaccard", "rep_where"}``.

Method
------
1. **Exact**: the cleaner's content key (:func:`ellama_recipes.data.clean._dedup_key`: lower-cased words, blake2b-64).
   Per key the smallest id is kept; every other document is an ``exact_duplicate`` of it (``jaccard`` 1.0).
   On Ray: a groupby (hash shuffle) over ``(key, id, where)`` only -- the text never travels through that shuffle.
2. **Candidates**: MinHash over the word 5-shingles (the cleaner's :func:`~ellama_recipes.data.clean._shingles`),
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
   itself and its neighbours, by joins + groupby, iterated until no label changes). Memory per node is bounded by
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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ellama_recipes.data.clean import _WORD, EXACT_DUPLICATE, NEAR_DUPLICATE, _dedup_key

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

OUTPUT_COLUMNS = ("id", "rep_id", "reason", "jaccard", "rep_where")


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

def _empty_output(ray_data):
    import pyarrow as pa

    schema = pa.schema([("id", pa.int64()), ("rep_id", pa.int64()), ("reason", pa.string()),
                        ("jaccard", pa.float64()), ("rep_where", pa.string())])
    return ray_data.from_arrow(schema.empty_table())


def _to_output(batch: dict, reason: str) -> dict:
    n = len(batch["id"])
    return {"id": np.asarray(batch["id"], dtype=np.int64), "rep_id": np.asarray(batch["rep_id"], dtype=np.int64),
            "reason": np.array([reason] * n, dtype=object), "jaccard": np.asarray(batch["jaccard"], dtype=np.float64),
            "rep_where": np.asarray(batch["rep_where"], dtype=object)}


def find_duplicates(ds: "ray.data.Dataset", cfg: DedupConfig = DedupConfig()) -> "ray.data.Dataset":
    """Input rows: ``{"id": int64 (global order; smaller = earlier = preferred representative), "text": str,
    "where": str ("file:line")}``. Output rows, ONLY for the documents to drop: ``{"id", "rep_id" (the kept
    document it duplicates: the smallest id of its exact-duplicate group, or for near duplicates the smallest kept
    document of its cluster it has a verified pair with -- the cluster's smallest id unless the cluster chains),
    "reason" ("exact_duplicate" | "near_duplicate"), "jaccard" (exact word-5-shingle Jaccard of (id, rep_id), 1.0
    for exact), "rep_where"}``.

    Exact dedup by the cleaner's content key through a groupby (shuffle); near dedup: MinHash signatures in
    parallel (``map_batches``), LSH bands exploded and grouped by band key (shuffle, spills to disk, never one
    in-memory index), candidate pairs verified by EXACT word-5-shingle Jaccard >= threshold, clusters by a
    distributed connected-components pass (label propagation with joins/groupbys, iterated until no label changes;
    nothing collected on the driver), and inside each cluster the rule of the module docstring (step 5): a
    document is dropped only if it has a verified pair (exact Jaccard >= threshold) with a kept document of its
    cluster; the smallest id of every cluster is kept. Deterministic. Returns a materialized dataset.
    """
    import ray.data as rd

    cfg_ = cfg
    base = ds.select_columns(["id", "text", "where"])

    # ---- exact: (xkey, id, where) grouped by xkey; text stays out of the shuffle
    def add_key(batch):
        return {"xkey": np.array([exact_key(t) for t in batch["text"]], dtype=np.int64),
                "id": np.asarray(batch["id"], dtype=np.int64), "where": batch["where"]}

    keyed = base.map_batches(add_key, batch_format="numpy").materialize()

    def exact_groups(g):
        order = np.argsort(g["id"], kind="stable")
        ids = np.asarray(g["id"], dtype=np.int64)[order]
        where = np.asarray(g["where"], dtype=object)[order]
        n = len(ids)
        return {"id": ids, "rep_id": np.full(n, ids[0], dtype=np.int64),
                "rep_where": np.array([where[0]] * n, dtype=object)}

    reps = keyed.groupby("xkey").map_groups(exact_groups, batch_format="numpy").materialize()
    exact_drops = (reps.filter(expr="id != rep_id")
                   .map_batches(lambda b: _to_output({**b, "jaccard": np.ones(len(b["id"]))}, EXACT_DUPLICATE),
                                batch_format="numpy"))
    parts = [exact_drops]
    if cfg_.near:
        kept_ids = reps.filter(expr="id == rep_id").select_columns(["id"])
        survivors = base.join(kept_ids, join_type="inner", num_partitions=_parts(base), on=("id",)).materialize()
        if survivors.count() > 1:
            parts.append(_near_duplicates(survivors, cfg_))
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p)
    out = out.materialize()
    return out


def _parts(ds) -> int:
    try:
        return max(1, min(64, ds.num_blocks()))
    except Exception:  # noqa: BLE001  (a lazy dataset without a known block count)
        return 8


def _near_duplicates(survivors, cfg: DedupConfig):
    """Near-duplicate drops among ``survivors`` (id, text, where), distributed."""
    import ray.data as rd

    nparts = _parts(survivors)

    def explode(batch):
        ids = np.asarray(batch["id"], dtype=np.int64)
        keys = band_keys(signatures(list(batch["text"]), cfg), cfg)
        return {"bkey": keys.reshape(-1), "id": np.repeat(ids, cfg.bands)}

    bands = survivors.map_batches(explode, batch_format="numpy")

    def pairs_of_bucket(g):
        ids = sorted(set(np.asarray(g["id"]).tolist()))
        prs = bucket_pairs(ids, cfg.bucket_cap)
        return {"a": np.array([p[0] for p in prs], dtype=np.int64), "b": np.array([p[1] for p in prs], dtype=np.int64)}

    cands = bands.groupby("bkey").map_groups(pairs_of_bucket, batch_format="numpy")

    def first_of_group(g):
        return {"a": np.asarray(g["a"][:1], dtype=np.int64), "b": np.asarray(g["b"][:1], dtype=np.int64)}

    cands = cands.groupby(["a", "b"]).map_groups(first_of_group, batch_format="numpy")  # distinct pairs
    side_a = survivors.rename_columns({"id": "a", "text": "text_a", "where": "where_a"})
    side_b = survivors.rename_columns({"id": "b", "text": "text_b", "where": "where_b"})
    with_a = cands.join(side_a, join_type="inner", num_partitions=nparts, on=("a",))
    with_ab = with_a.join(side_b, join_type="inner", num_partitions=nparts, on=("b",))

    def verify(batch):
        js = np.array([jaccard(shingle_set(x, cfg.shingle), shingle_set(y, cfg.shingle))
                       for x, y in zip(batch["text_a"], batch["text_b"])], dtype=np.float64)
        keep = js >= cfg.threshold
        return {"a": np.asarray(batch["a"], dtype=np.int64)[keep], "b": np.asarray(batch["b"], dtype=np.int64)[keep],
                "jaccard": js[keep], "where_a": np.asarray(batch["where_a"], dtype=object)[keep],
                "where_b": np.asarray(batch["where_b"], dtype=object)[keep]}

    edges = with_ab.map_batches(verify, batch_format="numpy").materialize()
    if edges.count() == 0:
        return _empty_output(rd)
    labels = connected_components(edges.select_columns(["a", "b"]), nparts)

    # each edge carries its cluster label (label of a == label of b after convergence)
    lab_a = labels.rename_columns({"node": "a"})
    edges_l = edges.join(lab_a, join_type="inner", num_partitions=nparts, on=("a",))

    def resolve(g):
        es = list(zip(np.asarray(g["a"]).tolist(), np.asarray(g["b"]).tolist(), np.asarray(g["jaccard"]).tolist()))
        where = {}
        for a, b, wa, wb in zip(np.asarray(g["a"]).tolist(), np.asarray(g["b"]).tolist(), g["where_a"], g["where_b"]):
            where[a], where[b] = wa, wb
        d = resolve_cluster(es)
        return _to_output({"id": [x[0] for x in d], "rep_id": [x[1] for x in d], "jaccard": [x[2] for x in d],
                           "rep_where": [where[x[1]] for x in d]}, NEAR_DUPLICATE)

    return edges_l.groupby("label").map_groups(resolve, batch_format="numpy")


def connected_components(edges, nparts: int = 8, max_iter: int = 1000):
    """Label propagation over the undirected ``edges`` (columns a, b): a materialized dataset ``(node, label)`` with
    ``label`` = the smallest node id of the node's component. Each round joins the labels onto both ends of every
    edge, proposes ``min(label_a, label_b)`` to both ends and keeps each node's minimum (a groupby); it stops when no
    label changed."""

    def endpoints(batch):
        nodes = np.concatenate([np.asarray(batch["a"], np.int64), np.asarray(batch["b"], np.int64)])
        return {"node": nodes, "label": nodes.copy()}

    def min_label(g):
        return {"node": np.asarray(g["node"][:1], np.int64), "label": np.asarray([np.min(g["label"])], np.int64)}

    labels = edges.map_batches(endpoints, batch_format="numpy").groupby("node").map_groups(
        min_label, batch_format="numpy").materialize()
    for _ in range(max_iter):
        la = labels.rename_columns({"node": "a", "label": "la"})
        lb = labels.rename_columns({"node": "b", "label": "lb"})
        e = (edges.join(la, join_type="inner", num_partitions=nparts, on=("a",))
             .join(lb, join_type="inner", num_partitions=nparts, on=("b",)))

        def propose(batch):
            m = np.minimum(np.asarray(batch["la"], np.int64), np.asarray(batch["lb"], np.int64))
            return {"node": np.concatenate([np.asarray(batch["a"], np.int64), np.asarray(batch["b"], np.int64)]),
                    "label": np.concatenate([m, m])}

        new = e.map_batches(propose, batch_format="numpy").groupby("node").map_groups(
            min_label, batch_format="numpy").materialize()
        old = labels.rename_columns({"label": "old"})
        changed = (new.join(old, join_type="inner", num_partitions=nparts, on=("node",))
                   .filter(expr="label != old").count())
        labels = new
        if changed == 0:
            return labels
    raise RuntimeError(f"label propagation did not converge in {max_iter} rounds")
