"""Re-blend an existing manifest's tokenized sources to a new general:domain ratio, without re-tokenizing.

Python (what ``ellama sweep --data MANIFEST --ratio 4:1,1:1,1:4`` calls once per ratio)::

    from ellama_recipes.data.reblend import reblend
    manifest = reblend(Path("data/manifest.json"), "4:1", Path("sweep/blends/r4-1"))

The new ``OUT/manifest.json`` has the same four keys as ``ellama data build``'s (``blend``, ``sources``,
``realized``, ``rejected``) and is computed by :func:`ellama_recipes.data.blend.make_manifest`, so the weights follow
exactly the same rule (token-aware side shares, the non-English share of the general side, sources in proportion
to their tokens) and ``realized`` is measured with megatron-core's blending index. Its prefixes point at the
original ``.bin/.idx`` files (relative to the new manifest's folder); nothing is copied or re-tokenized.
``OUT/reblend.json`` records where it came from.

The non-English share of the general side is kept from the source manifest's blend weights (exact, not the
sampled ``realized`` value) unless ``non_english`` is given.
"""

from __future__ import annotations

import os
from pathlib import Path

from ellama_recipes.data.blend import check_non_english, make_manifest, parse_ratio
from ellama_recipes.data.manifest import SOURCE_KEYS, load_manifest
from ellama_recipes.io.atomic import write_json
from ellama_recipes.errors import UserError


def read_source_manifest(path: str | Path) -> tuple[Path, dict]:
    """``(manifest file, manifest dict)``, checked by :func:`ellama_recipes.data.manifest.load_manifest` (every
    prefix's .bin/.idx exists) plus the source fields a re-blend needs."""
    m = load_manifest(path)
    p = Path(m["path"])
    problems = []
    for i, s in enumerate(m["sources"]):
        missing = [k for k in SOURCE_KEYS if k not in s]
        if missing:
            problems.append(f"sources[{i}] lacks {', '.join(missing)}")
            continue
        full = _resolve(p.parent, s["prefix"])
        for ext in (".bin", ".idx"):
            if not Path(str(full) + ext).is_file():
                problems.append(f"source {s['prefix']!r}: {full}{ext} is missing (the tokenized data moved?)")
    if problems:
        raise UserError(f"Cannot re-blend {p}: it is not a usable `ellama data build` manifest. Fix: rebuild it "
                        "with `ellama data build` or pass the right --data.", problems=problems)
    return p, {k: m[k] for k in m if k not in ("path", "train_blend", "side_prefixes")}


def non_english_share(manifest: dict) -> float:
    """The non-English share of the general side's weight in ``manifest['blend']`` (0 when no general weight)."""
    side = {s["prefix"]: (s["side"], s["lang"]) for s in manifest["sources"]}
    blend = manifest["blend"]
    gen = non_en = 0.0
    for w, pre in zip(blend[0::2], blend[1::2]):
        s, lang = side.get(pre, (None, None))
        if s == "general":
            gen += float(w)
            if lang != "en":
                non_en += float(w)
    return non_en / gen if gen > 0 else 0.0


def reblend_manifest(path: str | Path, ratio: str, out: str | Path, non_english: float | None = None,
                     num_samples: int = 100_000) -> dict:
    """The re-blended manifest dict for ``ratio`` (nothing written); prefixes relative to ``out``."""
    src_path, m = read_source_manifest(path)
    parse_ratio(ratio)
    q = check_non_english(non_english_share(m) if non_english is None else non_english)
    out = Path(out).absolute()
    sources = []
    for s in m["sources"]:
        full = _resolve(src_path.parent, s["prefix"])
        sources.append({**{k: s[k] for k in SOURCE_KEYS}, "prefix": os.path.relpath(full, out)})
    return make_manifest(sources, ratio, round(q, 12), dict(m.get("rejected") or {}), num_samples)


def reblend(path: str | Path, ratio: str, out: str | Path, non_english: float | None = None,
            num_samples: int = 100_000) -> dict:
    """Write ``out/manifest.json`` (and ``out/reblend.json``) for ``ratio``; returns the manifest dict."""
    src_path, _ = read_source_manifest(path)
    out = Path(out)
    manifest = reblend_manifest(src_path, ratio, out, non_english, num_samples)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "reblend.json", {"from": str(src_path.absolute()), "ratio": ratio,
                                             "general_to_domain": parse_ratio(ratio)})
    write_json(out / "manifest.json", manifest)
    return manifest


def _resolve(root: Path, prefix: str) -> Path:
    pre = Path(prefix)
    return Path(os.path.normpath(pre if pre.is_absolute() else Path(root).absolute() / pre))


__all__ = ["read_source_manifest", "non_english_share", "reblend_manifest", "reblend"]
