"""Stage 2, serialize: domain records to training text, with the EcomGPT-CT graph mix or plain separate samples.

CLI: ``ellama data serialize --input work/clean/domain.jsonl --out work/serialized --mix graph``

``graph`` (EcomGPT-CT): every record (product, review, article) is a node; records sharing a product id are
connected (an article mentioning several products links them). Clusters are taken greedily: start from a product
id, first take one node of each source not yet in the cluster (so a cluster covers as many sources as it can),
then fill up to ``max_chars``; if the cluster is still under ``min_chars`` grow it through product ids linked by
the cluster's articles. The cluster's nodes are shuffled and concatenated into one training sample and leave the
graph (no node is used twice). Every node ends up in exactly one sample; a node with no neighbours left becomes a
sample on its own.

``separate``: one sample per record (the baseline EcomGPT-CT compares against).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ellama_recipes.data.records import render

SOURCES = ("product", "review", "article")
MIXES = ("graph", "separate")


def product_ids(rec: dict) -> list[str]:
    t = rec["type"]
    if t == "product":
        return [rec["id"]]
    if t == "review":
        return [rec["product_id"]]
    if t == "article":
        return list(dict.fromkeys(rec["product_ids"]))
    return []


@dataclass
class MixConfig:
    mix: str = "graph"
    min_chars: int = 600
    max_chars: int = 4000
    seed: int = 1234


def _sample(nodes: list[dict], texts: list[str], order: list[int]) -> dict:
    langs = Counter(nodes[i].get("lang") or "und" for i in order)
    return {
        "text": "\n\n".join(texts[i] for i in order),
        "lang": langs.most_common(1)[0][0],
        "sources": sorted({nodes[i]["type"] for i in order}),
        "product_ids": sorted({p for i in order for p in product_ids(nodes[i])}),
        "records": [nodes[i].get("_src", str(i)) for i in order],
    }


def serialize(records: Iterable[dict], cfg: MixConfig) -> list[dict]:
    """Turn cleaned domain records into training samples ``{"text","lang","sources","product_ids","records"}``."""
    if cfg.mix not in MIXES:
        from ellama_recipes.errors import UserError

        raise UserError(f"Unknown --mix {cfg.mix!r}. Use one of: {', '.join(MIXES)}.")
    nodes = list(records)
    texts = [render(n) for n in nodes]
    if cfg.mix == "separate":
        return [_sample(nodes, texts, [i]) for i in range(len(nodes))]
    return graph_mix(nodes, texts, cfg)


def graph_mix(nodes: list[dict], texts: list[str], cfg: MixConfig) -> list[dict]:
    rng = random.Random(cfg.seed)
    by_pid: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for p in product_ids(n):
            by_pid.setdefault(p, []).append(i)
    used = [False] * len(nodes)
    size = [len(t) + 2 for t in texts]
    seeds = sorted(by_pid)
    rng.shuffle(seeds)
    samples: list[dict] = []
    for seed in seeds:
        while True:  # a product id with many records can seed several clusters
            cand = [i for i in by_pid[seed] if not used[i]]
            if not cand:
                break
            cluster = _grow(seed, cand, nodes, used, size, by_pid, cfg, rng)
            for i in cluster:
                used[i] = True
            order = list(cluster)
            rng.shuffle(order)
            samples.append(_sample(nodes, texts, order))
    leftover = [i for i, u in enumerate(used) if not u]  # records without product ids (none in valid input)
    for i in leftover:
        used[i] = True
        samples.append(_sample(nodes, texts, [i]))
    return samples


def _grow(seed: str, cand: list[int], nodes: list[dict], used: list[bool], size: list[int],
          by_pid: dict[str, list[int]], cfg: MixConfig, rng: random.Random) -> list[int]:
    cluster: list[int] = []
    in_cluster: set[int] = set()
    total = 0
    covered: set[str] = set()
    seen_pids = {seed}
    frontier = list(cand)
    rng.shuffle(frontier)

    def fits(i: int) -> bool:
        return total + size[i] <= cfg.max_chars or not cluster

    def add(i: int) -> None:
        nonlocal total
        cluster.append(i)
        in_cluster.add(i)
        total += size[i]
        covered.add(nodes[i]["type"])

    while True:
        # 1) cover sources not yet in the cluster
        for src in SOURCES:
            if src in covered:
                continue
            for i in frontier:
                if i not in in_cluster and nodes[i]["type"] == src and fits(i):
                    add(i)
                    break
        # 2) fill up to max_chars
        for i in frontier:
            if i not in in_cluster and fits(i) and total < cfg.max_chars:
                add(i)
        if total >= cfg.min_chars:
            break
        # 3) still small: grow through product ids linked by the cluster's records (articles link several)
        new_pids = [p for i in cluster for p in product_ids(nodes[i]) if p not in seen_pids]
        new = []
        for p in dict.fromkeys(new_pids):
            seen_pids.add(p)
            new.extend(j for j in by_pid[p] if not used[j] and j not in in_cluster and j not in frontier)
        if not new:
            break
        rng.shuffle(new)
        frontier = [i for i in frontier if i not in in_cluster] + new
    return cluster


def mix_stats(samples: list[dict]) -> dict:
    n = len(samples)
    return {
        "samples": n,
        "records": sum(len(s["records"]) for s in samples),
        "mean_sources_per_sample": (sum(len(s["sources"]) for s in samples) / n) if n else 0.0,
        "mean_chars_per_sample": (sum(len(s["text"]) for s in samples) / n) if n else 0.0,
    }
