"""Stage 5, blend: token-aware Megatron blend weights and ``manifest.json``.

CLI: ``ellama data blend data/ --ratio 1:1 --non-english 0.10``

How Megatron uses the weights (megatron-core 0.15 ``BlendedMegatronDatasetBuilder`` / ``BlendedDataset``): the
weights are normalised and become *sampling probabilities over samples*; ``helpers.build_blending_indices`` assigns
sample ``i`` to the dataset with the largest deficit ``w_k * i - drawn_k``, so after N samples dataset k has
supplied ``w_k * N`` samples (+-1). Every GPT sample is a fixed window of ``seq_length + 1`` tokens cut from that
dataset's concatenated documents, so a dataset's share of samples *is* its share of training tokens, independent
of how many tokens the dataset holds (a small dataset is repeated, a large one subsampled; Megatron-LM issue 547).

Therefore the weight of a source is the fraction of training tokens it should supply:

- general side total ``r / (1 + r)``, domain side ``1 / (1 + r)`` for ``--ratio r:1`` (general:domain);
- on the general side, non-English sources (``lang != "en"``) get ``q`` of the general share (``--non-english q``)
  and English sources ``1 - q``;
- inside each group, sources share in proportion to their token counts (the natural distribution).

``realized`` is measured, not restated: megatron-core's own ``build_blending_indices`` is run for ``num_samples``
(default 100,000) samples and the drawn samples are counted per side and language; with equal-length samples those
counts are token counts.
"""

from __future__ import annotations

from collections import Counter

from ellama_recipes.data.manifest import OPTIONAL_SOURCE_KEYS, SOURCE_KEYS
from ellama_recipes.errors import UserError


def parse_ratio(ratio: str | float) -> float:
    """``"G:D"`` (general:domain by tokens) -> G/D as a float."""
    if isinstance(ratio, (int, float)):
        val = float(ratio)
    else:
        parts = str(ratio).split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            g, d = float(parts[0]), float(parts[1])
        except ValueError:
            raise UserError(f"--ratio {ratio!r} is not of the form GENERAL:DOMAIN (e.g. 1:1, 4:1, 1:4).") from None
        if d <= 0 or g <= 0:
            raise UserError(f"--ratio {ratio!r}: both parts must be > 0 (e.g. 1:1).")
        val = g / d
    if val <= 0:
        raise UserError(f"--ratio {ratio!r} must be positive.")
    return val


def check_non_english(q: float) -> float:
    if not 0.0 <= float(q) < 1.0:
        raise UserError(f"--non-english {q} must be in [0, 1) (a share of the general side's tokens, e.g. 0.10).")
    return float(q)


def compute_weights(sources: list[dict], ratio: float, non_english: float) -> list[float]:
    """Weights (summing to 1) for ``sources`` (dicts with side, lang, tokens); see the module docstring."""
    groups: dict[str, list[int]] = {"domain": [], "general_en": [], "general_x": []}
    for i, s in enumerate(sources):
        if s["tokens"] <= 0:
            continue
        if s["side"] == "domain":
            groups["domain"].append(i)
        elif s["lang"] == "en":
            groups["general_en"].append(i)
        else:
            groups["general_x"].append(i)
    if not groups["domain"]:
        raise UserError("No domain tokens to blend: every domain record was rejected or no domain source was given. "
                        "Check the rejects table and pass valid --domain data.")
    if not groups["general_en"] and not groups["general_x"]:
        raise UserError("No general tokens to blend: pass valid --general data (general replay text is what keeps "
                        "the model from forgetting).")
    share_g = ratio / (1.0 + ratio)
    share = {"domain": 1.0 - share_g, "general_en": share_g * (1.0 - non_english), "general_x": share_g * non_english}
    if non_english > 0 and not groups["general_x"]:
        raise UserError(f"--non-english {non_english} asks for non-English general text, but every general document "
                        "is English. Add non-English general data (tokenized as its own source per language, e.g. `ellama data "
                        "tokenize --input general_de.jsonl --side general --lang de`), or pass --non-english 0.")
    if non_english < 1 and not groups["general_en"]:
        raise UserError("There is no English general text, so the non-English share cannot be met. Add English "
                        "general data.")
    w = [0.0] * len(sources)
    for g, idx in groups.items():
        tot = sum(sources[i]["tokens"] for i in idx)
        for i in idx:
            w[i] = share[g] * sources[i]["tokens"] / tot
    s = sum(w)
    return [x / s for x in w]


def realized(sources: list[dict], weights: list[float], num_samples: int = 100_000) -> dict:
    """Token ratios actually drawn by Megatron's blending index over ``num_samples`` samples."""
    from ellama_recipes.data.indexed import blending_counts

    live = [i for i, w in enumerate(weights) if w > 0]
    counts = blending_counts([weights[i] for i in live], num_samples)
    drawn = Counter()
    for i, c in zip(live, counts):
        s = sources[i]
        drawn[s["side"]] += int(c)
        if s["side"] == "general" and s["lang"] != "en":
            drawn["general_non_english"] += int(c)
    return {
        "general_to_domain_token_ratio": round(drawn["general"] / drawn["domain"], 4) if drawn["domain"] else None,
        "non_english_share_of_general": round(drawn["general_non_english"] / drawn["general"], 4) if drawn["general"] else None,
    }


def make_manifest(sources: list[dict], ratio: float | str, non_english: float, rejected: dict[str, int],
                  num_samples: int = 100_000) -> dict:
    """The manifest dict (exactly ``blend``, ``sources``, ``realized``, ``rejected``). Sources with no tokens or
    zero weight are left out of both ``blend`` and ``sources``."""
    r = parse_ratio(ratio)
    q = check_non_english(non_english)
    weights = compute_weights(sources, r, q)
    keep = [i for i, w in enumerate(weights) if w > 0]
    # a mined source also says how it was mined (budget, lowest score): {"mined": {...}}
    srcs = [{**{k: sources[i][k] for k in SOURCE_KEYS}, **{k: sources[i][k] for k in OPTIONAL_SOURCE_KEYS if k in sources[i]}}
            for i in keep]
    ws = [weights[i] for i in keep]
    blend: list = []
    for w, s in zip(ws, srcs):
        blend += [round(w, 12), s["prefix"]]
    return {
        "blend": blend,
        "sources": srcs,
        "realized": realized(srcs, ws, num_samples),
        "rejected": dict(sorted(rejected.items())),
    }
