"""Exact + near-duplicate detection (ellama_recipes/data/dedup.py, issue 19): quality against a brute-force exact
Jaccard reference on a planted corpus, the cluster rule on chains, determinism, reasons with file:line, the
streaming cleaner's NearDup agreeing with the batch result. The Ray Data path (:func:`ray_case_rows`) runs on the
2-node cluster of tests/test_ray_data.py (loopback-only network namespace) and must give exactly the in-process
result."""

from __future__ import annotations

import random

import pytest

from ellama_recipes.data.clean import NearDup
from ellama_recipes.data.dedup import (DedupConfig, bucket_pairs, find_duplicates_local, jaccard, resolve_cluster,
                                       shingle_set)
from ellama_recipes.data.planted_dups import planted_corpus, reference_pairs

CFG = DedupConfig()


@pytest.fixture(scope="module")
def corpus():
    rows = planted_corpus(n_base=150, seed=3)
    return rows, reference_pairs(rows)


def _key(d):
    return (int(d["id"]), int(d["rep_id"]), d["reason"], round(float(d["jaccard"]), 9), d["rep_where"])


def J(x: str, y: str) -> float:
    return jaccard(shingle_set(x), shingle_set(y))


def test_recall_and_false_removal_against_brute_force(corpus):
    rows, ref = corpus
    text = {r["id"]: r["text"] for r in rows}
    drops = find_duplicates_local(rows, CFG)
    dropped = {d["id"] for d in drops}
    kept = set(text) - dropped
    hi = [p for p, j in ref.items() if j >= 0.8]
    lo = [p for p, j in ref.items() if j <= 0.7]
    assert len(hi) >= 60 and len(lo) >= 200, "the planted corpus should have pairs on both sides"
    caught = sum(1 for a, b in hi if a in dropped or b in dropped)
    assert caught / len(hi) >= 0.95, (caught, len(hi))
    # every drop is a verified pair with a KEPT document, at the Jaccard it reports
    for d in drops:
        assert d["rep_id"] in kept and d["rep_id"] < d["id"]
        j = J(text[d["id"]], text[d["rep_id"]])
        assert j >= CFG.threshold and abs(j - d["jaccard"]) < 1e-12, d
    pair_j = lambda x, y: ref.get((min(x, y), max(x, y)), 0.0)  # noqa: E731
    unjustified = {x for x in dropped if not any(pair_j(x, k) >= 0.8 for k in kept)}
    falsely = sum(1 for a, b in lo if a in unjustified or b in unjustified)
    assert falsely / len(lo) <= 0.02
    # no two kept documents form a pair >= threshold (the rule leaves no duplicate pair behind)
    assert not [p for p in hi if p[0] in kept and p[1] in kept]


def test_deterministic_and_independent_of_input_order(corpus):
    rows, _ = corpus
    a = find_duplicates_local(rows, CFG)
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    b = find_duplicates_local(shuffled, CFG)
    assert a == b and a == find_duplicates_local(rows, CFG)


def _chain():
    """A ~ B ~ C with J(A, B), J(B, C) >= 0.8 and J(A, C) < 0.8."""
    rng = random.Random(5)
    a = [f"w{rng.randrange(10_000)}" for _ in range(120)]
    b = list(a)
    for p in (20, 80):
        b[p] = "xb" + b[p]
    c = list(b)
    for p in (50, 105):
        c[p] = "xc" + c[p]
    A, B, C = (" ".join(x) for x in (a, b, c))
    assert J(A, B) >= 0.8 and J(B, C) >= 0.8 and J(A, C) < 0.8, (J(A, B), J(B, C), J(A, C))
    return A, B, C


def test_chain_keeps_the_far_end_by_the_documented_rule():
    A, B, C = _chain()
    rows = [{"id": 0, "text": A, "where": "f:1"}, {"id": 1, "text": B, "where": "f:2"},
            {"id": 2, "text": C, "where": "f:3"}]
    d = find_duplicates_local(rows, CFG)
    assert [(x["id"], x["rep_id"], x["reason"], x["rep_where"]) for x in d] == [(1, 0, "near_duplicate", "f:1")]
    # the middle document first: it is kept and both ends are its duplicates
    rows2 = [{"id": 0, "text": B, "where": "g:1"}, {"id": 1, "text": A, "where": "g:2"},
             {"id": 2, "text": C, "where": "g:3"}]
    assert [(x["id"], x["rep_id"]) for x in find_duplicates_local(rows2, CFG)] == [(1, 0), (2, 0)]


def test_resolve_cluster_rule():
    # 1-2 and 2-3 and 3-4 edges, 1 kept -> 2 dropped -> 3 kept -> 4 dropped (rep 3)
    assert resolve_cluster([(1, 2, 0.9), (2, 3, 0.85), (3, 4, 0.95)]) == [(2, 1, 0.9), (4, 3, 0.95)]
    # the smallest kept neighbour is the representative
    assert resolve_cluster([(1, 5, 0.81), (2, 5, 0.99)]) == [(5, 1, 0.81)]
    # a star around a later document: the earliest is kept, the centre dropped, the other leaves kept
    assert resolve_cluster([(1, 9, 0.9), (2, 9, 0.9), (3, 9, 0.9)]) == [(9, 1, 0.9)]


def test_bucket_pairs_cap():
    assert bucket_pairs([1, 2, 3], 64) == [(1, 2), (1, 3), (2, 3)]
    ids = list(range(100))
    prs = bucket_pairs(ids, 8)
    assert all(a < b for a, b in prs) and len(set(prs)) == len(prs)
    assert len(prs) <= 100 * 8 and all((0, j) in set(prs) for j in range(1, 100))


def test_reasons_and_where():
    base = " ".join(f"word{i}" for i in range(200))
    rows = [{"id": 0, "text": base, "where": "a.jsonl:1"},
            {"id": 1, "text": base.upper() + "!!", "where": "a.jsonl:2"},  # same words: exact
            {"id": 2, "text": base.replace("word30 ", "WORDX "), "where": "b.jsonl:7"},  # near
            {"id": 3, "text": " ".join(f"other{i}" for i in range(200)), "where": "b.jsonl:8"}]
    d = find_duplicates_local(rows, CFG)
    assert [(x["id"], x["rep_id"], x["reason"], x["rep_where"]) for x in d] == [
        (1, 0, "exact_duplicate", "a.jsonl:1"), (2, 0, "near_duplicate", "a.jsonl:1")]
    assert d[0]["jaccard"] == 1.0 and 0.8 <= d[1]["jaccard"] < 1.0
    assert find_duplicates_local(rows, DedupConfig(near=False)) == d[:1]


def test_streaming_neardup_agrees_with_batch(corpus):
    rows, _ = corpus
    batch = {d["id"]: d["rep_id"] for d in find_duplicates_local(rows, CFG) if d["reason"] == "near_duplicate"}
    exact = {d["id"] for d in find_duplicates_local(rows, DedupConfig(near=False))}
    nd, got = NearDup(0.8, 64), {}
    for r in sorted(rows, key=lambda r: r["id"]):
        if r["id"] in exact:
            continue
        if nd.seen(r["text"], key=r["id"]):
            got[r["id"]] = nd.last_match[0]
    assert got == batch


def ray_case_rows() -> list[dict]:
    """The Ray dedup case: the planted corpus above, a chain A ~ B ~ C and an exact copy of A. Run on a 2-node Ray
    cluster in a loopback-only network namespace by tests/test_ray_data.py (one cluster start for every Ray check:
    ``test_ray_dedup_on_two_nodes_equals_local`` compares it with :func:`find_duplicates_local`)."""
    A, B, C = _chain()
    chain = [{"id": 10_000 + i, "text": t, "where": f"chain:{i}"} for i, t in enumerate((A, B, C))]
    exact = [{"id": 20_000, "text": A.upper(), "where": "exact:1"}]
    return planted_corpus(n_base=150, seed=3) + chain + exact
