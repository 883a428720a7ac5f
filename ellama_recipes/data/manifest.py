"""``manifest.json``: the contract between ``ellama data`` (which writes it) and training (which reads it).

Written by :func:`ellama_recipes.data.blend.make_manifest` (``ellama data build`` / ``ellama data blend``)::

    {"blend": [w1, "prefix1", w2, "prefix2", ...],            # Megatron list form, weights sum to 1
     "sources": [{"prefix", "side": "domain"|"general", "lang", "documents", "tokens", "mined"?}, ...],
     "realized": {...}, "rejected": {...}}

Prefixes are relative to the manifest's folder. ``PREFIX.source.json`` sidecars (written by ``ellama data
tokenize``) describe one tokenized source each. Plain Python: the engine's data module reads the manifest through
:func:`load_manifest`, and nothing here imports the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ellama_recipes.errors import UserError
from ellama_recipes.io.atomic import write_json

MANIFEST_KEYS = ("blend", "sources", "realized", "rejected")
SOURCE_KEYS = ("prefix", "side", "lang", "documents", "tokens")
# "mined": a source mined from the general corpus ({budget, min_score, ...}); "source": the source a shard belongs
# to (the Ray build writes each source as shards tokenized/NAME/NAME-00000.., one entry each, "source": NAME)
OPTIONAL_SOURCE_KEYS = ("mined", "source")
SIDES = ("domain", "general")
# what a recipe shows for data.manifest before --data is given (treated as "no manifest")
MANIFEST_PLACEHOLDER = "<unset: pass --data DIR/manifest.json (written by `ellama data build`)>"


def write_source_sidecar(prefix: Path, side: str, lang: str, documents: int, tokens: int, **extra: Any) -> dict:
    """Write ``PREFIX.source.json`` (side, lang, documents, tokens, plus any ``extra`` keys); returns its dict."""
    meta = {"side": side, "lang": lang, "documents": documents, "tokens": tokens, **extra}
    prefix = Path(prefix)
    write_json(prefix.parent / f"{prefix.name}.source.json", meta)
    return meta


def read_source_sidecars(folder: Path) -> list[dict]:
    """Sources described by ``*.source.json`` sidecars (written by ``ellama data tokenize``) under ``folder``."""
    out = []
    for p in sorted(folder.rglob("*.source.json")):
        d = json.loads(p.read_text())
        prefix = str(p.with_name(p.name[: -len(".source.json")]).relative_to(folder))
        out.append({"prefix": prefix, **{k: d[k] for k in SOURCE_KEYS[1:]},
                    **{k: d[k] for k in OPTIONAL_SOURCE_KEYS if k in d}})
    if not out:
        raise UserError(f"No tokenized sources (*.source.json beside .bin/.idx) under {str(folder)!r}. Run "
                        "`ellama data tokenize ... --out FOLDER/NAME --side domain|general` first.")
    return out


def load_manifest(path: str | Path | None) -> dict[str, Any]:
    """Read and check ``manifest.json`` (a file or its folder); UserError listing every problem.

    Returns the manifest plus ``path`` (absolute), ``train_blend`` (Megatron list form with absolute prefixes) and
    ``side_prefixes`` (absolute prefixes per side, for per-side validation).
    """
    if path in (None, "", MANIFEST_PLACEHOLDER):
        raise UserError(
            "No data manifest was given. Fix: run `ellama data build ... --out DIR` and pass --data DIR/manifest.json."
        )
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise UserError(
            f"Data manifest {str(path)!r} does not exist. Fix: pass the manifest.json written by "
            f"`ellama data build --out DIR` (e.g. --data DIR/manifest.json)."
        )
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"Data manifest {str(p)!r} is not valid JSON ({exc}). Fix: re-run `ellama data build`.") from None
    problems: list[str] = []
    blend = m.get("blend") if isinstance(m, dict) else None
    if not isinstance(blend, list) or not blend or len(blend) % 2:
        problems.append("`blend` must be a non-empty list [w1, prefix1, w2, prefix2, ...]")
        blend = []
    sources = m.get("sources") if isinstance(m, dict) else None
    if not isinstance(sources, list) or not sources:
        problems.append("`sources` must be a non-empty list of {prefix, side, lang, documents, tokens}")
        sources = []
    root = p.parent
    weights, prefixes = blend[0::2], blend[1::2]
    for w, pre in zip(weights, prefixes):
        if not isinstance(w, (int, float)) or w < 0:
            problems.append(f"blend weight {w!r} for {pre!r} must be a number >= 0")
        if not isinstance(pre, str):
            problems.append(f"blend prefix {pre!r} must be a string")
            continue
        full = (root / pre) if not Path(pre).is_absolute() else Path(pre)
        for ext in (".bin", ".idx"):
            if not Path(str(full) + ext).is_file():
                problems.append(f"blend prefix {pre!r}: {full}{ext} is missing")
    side_of: dict[str, str] = {}
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or "prefix" not in s or s.get("side") not in SIDES:
            problems.append(f"sources[{i}] must have a `prefix` and `side` in {SIDES}, got {s!r}")
            continue
        side_of[s["prefix"]] = s["side"]
    for pre in prefixes:
        if isinstance(pre, str) and sources and pre not in side_of:
            problems.append(f"blend prefix {pre!r} has no entry in `sources` (its side is unknown)")
    if problems:
        raise UserError(
            f"Data manifest {str(p)} is malformed. Fix: re-run `ellama data build` to rewrite it.", problems=problems
        )

    def absolute(pre: str) -> str:
        return str(Path(pre) if Path(pre).is_absolute() else (root / pre).resolve())

    return {
        **m,
        "path": str(p.resolve()),
        "train_blend": [x for w, pre in zip(weights, prefixes) for x in (float(w), absolute(pre))],
        "side_prefixes": {
            side: [absolute(pre) for pre in prefixes if side_of.get(pre) == side and isinstance(pre, str)]
            for side in SIDES
        },
    }
