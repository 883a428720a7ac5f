"""Only ellama_recipes/engine/ may import NeMo (nemo.*) or megatron-core (megatron.*). nemo_run is the launcher."""

from __future__ import annotations

import re
from pathlib import Path

import ellama_recipes

PKG = Path(ellama_recipes.__file__).parent
PATTERN = re.compile(r"^\s*(?:from|import)\s+(nemo|megatron)(?:\.|\s|$)", re.MULTILINE)


def test_only_engine_imports_nemo_or_megatron():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "engine":
            continue
        for m in PATTERN.finditer(path.read_text(encoding="utf-8")):
            line = path.read_text(encoding="utf-8")[: m.start()].count("\n") + 1
            offenders.append(f"{rel}:{line}: {m.group(0).strip()}")
    assert not offenders, "NeMo/megatron imported outside ellama_recipes/engine/:\n" + "\n".join(offenders)


def test_pattern_catches_what_it_should():
    assert PATTERN.search("from nemo.collections import llm")
    assert PATTERN.search("    import megatron.core")
    assert not PATTERN.search("import nemo_run as run")


def test_no_generic_top_level_module():
    import importlib.util

    assert importlib.util.find_spec("ellama_recipes.cli") is not None
    top = {p.name for p in PKG.parent.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert "cli" not in top
