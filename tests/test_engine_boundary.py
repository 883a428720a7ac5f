"""The house rules of the package's imports, checked on the source (module-level statements, unless said otherwise):

- only ``ellama_recipes/engine/`` imports NeMo (``nemo.*``), megatron-core (``megatron.*``) or NeMo-Run at module level;
- nothing outside ``engine/`` imports ``ellama_recipes.engine`` at module level, except the registered stage recipes
  (``recipes/``) and the CLI entry points (``cli/``);
- data flows one way: ``data/`` imports none of recipe / recipes / engine / cli / launch at module level;
- the engine runs what it is given: nothing under ``engine/`` imports the layers above it (recipes / cli / launch /
  sweep / quickstart / align) anywhere, function bodies and ``importlib.import_module("...")`` included;
- no import circles between the package's modules at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ellama_recipes

PKG = Path(ellama_recipes.__file__).parent
HEAVY = ("nemo", "megatron", "nemo_run")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_level_imports(source: str, module: str = "ellama_recipes.x") -> list[tuple[int, str]]:
    """(line, imported module) for every import executed when the module is imported: top-level statements and
    the bodies of top-level if/try/with blocks, not functions or classes; ``if TYPE_CHECKING:`` is skipped."""
    out: list[tuple[int, str]] = []
    package = module.rsplit(".", 1)[0]

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                out.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                out.append((node.lineno, base))
                # `from ellama_recipes.workflows import launch` imports the submodule ellama_recipes.workflows.launch
                out.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    visit(ast.parse(source).body)
    return out


def all_imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import anywhere in the module (function and method bodies, ``if
    TYPE_CHECKING:`` blocks) and every ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
    ``package``: the package relative imports start from (the module's own name for an ``__init__.py``)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return sorted(out)


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        yield path.relative_to(PKG), _module_name(path), module_level_imports(path.read_text(encoding="utf-8"),
                                                                                _module_name(path))


def _is(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def test_only_engine_imports_nemo_megatron_nemo_run():
    offenders = [
        f"{rel}:{line}: import {name}"
        for rel, _, imports in _sources()
        if rel.parts[0] != "engine"
        for line, name in imports
        if any(_is(name, h) for h in HEAVY)
    ]
    assert not offenders, "NeMo / megatron / NeMo-Run imported at module level outside engine/:\n" + "\n".join(offenders)


def test_only_recipes_and_cli_import_the_engine():
    offenders = [
        f"{rel}:{line}: import {name}"
        for rel, _, imports in _sources()
        if rel.parts[0] not in ("engine", "recipes", "cli")
        for line, name in imports
        if _is(name, "ellama_recipes.engine")
    ]
    assert not offenders, "ellama_recipes.engine imported at module level outside engine/, recipes/, cli/:\n" + "\n".join(
        offenders)


def test_data_flows_one_way():
    higher = ("ellama_recipes.config.schema", "ellama_recipes.recipes", "ellama_recipes.engine", "ellama_recipes.cli",
              "ellama_recipes.workflows.launch", "ellama_recipes.workflows.plan")
    offenders = [
        f"{rel}:{line}: import {name}"
        for rel, _, imports in _sources()
        if rel.parts[0] == "data"
        for line, name in imports
        if any(_is(name, h) for h in higher)
    ]
    assert not offenders, "data/ imports a higher layer at module level:\n" + "\n".join(offenders)


ABOVE_ENGINE = ("ellama_recipes.recipes", "ellama_recipes.cli", "ellama_recipes.workflows")


def test_engine_never_imports_the_layers_above_it():
    engine = PKG / "engine"
    offenders = []
    for path in sorted(engine.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        offenders += [
            f"{path.relative_to(PKG)}:{line}: import {name}"
            for line, name in all_imports(path.read_text(encoding="utf-8"), package)
            if any(_is(name, h) for h in ABOVE_ENGINE)
        ]
    assert not offenders, (
        "engine/ imports a layer above it (the caller builds and checks what the engine runs and passes it in):\n"
        + "\n".join(offenders))


@pytest.mark.parametrize(
    "source,hits",
    [
        ("def f():\n    from ellama_recipes.recipes import get_recipe\n",
         ["ellama_recipes.recipes", "ellama_recipes.recipes.get_recipe"]),
        ("class A:\n    def m(self):\n        from .. import launch\n", ["ellama_recipes", "ellama_recipes.launch"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ellama_recipes.workflows.sweep\n",
         ["typing", "typing.TYPE_CHECKING", "ellama_recipes.workflows.sweep"]),
        ("import importlib\ndef f():\n    return importlib.import_module('ellama_recipes.cli.app')\n",
         ["importlib", "ellama_recipes.cli.app"]),
        ("def f():\n    from ellama_recipes.engine import experiment\n",
         ["ellama_recipes.engine", "ellama_recipes.engine.experiment"]),
    ],
)
def test_the_all_imports_scanner_sees_what_it_should(source, hits):
    assert [name for _, name in all_imports(source, "ellama_recipes.engine")] == hits


def find_cycles(graph: dict[str, list[str]]) -> list[str]:
    """Every import circle reachable in ``graph`` (module -> modules it imports), as ``a -> b -> a``."""
    cycles, state = [], {}

    def dfs(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for mod in graph:
        if mod not in state:
            dfs(mod, [])
    return cycles


def test_no_import_circles():
    modules = {mod: imports for _, mod, imports in _sources()}
    graph = {
        mod: sorted({name for _, name in imports if name in modules and name != mod}) for mod, imports in modules.items()
    }
    assert not find_cycles(graph), "module-level import circles:\n" + "\n".join(find_cycles(graph))


def test_the_circle_finder_finds_circles():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


@pytest.mark.parametrize(
    "source,hits",
    [
        ("from nemo.collections import llm", ["nemo.collections", "nemo.collections.llm"]),
        ("import megatron.core", ["megatron.core"]),
        ("def f():\n    import nemo\n", []),  # lazy: fine
        ("try:\n    import nemo_run as run\nexcept ImportError:\n    pass\n", ["nemo_run"]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import nemo\n", ["typing", "typing.TYPE_CHECKING"]),
        ("from . import launch", ["ellama_recipes", "ellama_recipes.launch"]),
    ],
)
def test_the_import_scanner_sees_what_it_should(source, hits):
    assert [name for _, name in module_level_imports(source, "ellama_recipes.x")] == hits


def test_no_generic_top_level_module():
    import importlib.util

    assert importlib.util.find_spec("ellama_recipes.cli") is not None
    top = {p.name for p in PKG.parent.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert "cli" not in top


# The floors of the house, lowest first: a module imports (anywhere: module level, function bodies, TYPE_CHECKING)
# only modules of its own folder or of a lower floor. Data flows one way: data -> recipes -> engine -> run folders ->
# export / eval; the engine runs what the recipes build, the workflows chain the stages, the CLI parses flags.
FLOORS = ("errors", "io", "data", "model", "config", "engine", "recipes", "workflows", "cli")


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "ellama_recipes" or len(parts) < 2:
        return None
    return FLOORS.index(parts[1]) if parts[1] in FLOORS else None


def test_every_module_has_a_floor():
    homeless = [str(rel) for rel, mod, _ in _sources() if mod != "ellama_recipes" and _floor(mod) is None
                and mod not in ("ellama_recipes.__main__",)]
    assert not homeless, f"modules outside the floors {FLOORS}: {homeless}"


def test_no_import_runs_up_the_house():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        module = _module_name(path)
        mine = _floor(module)
        if mine is None:
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for line, name in all_imports(path.read_text(encoding="utf-8"), package):
            theirs = _floor(name)
            if theirs is not None and theirs > mine:
                offenders.append(f"{path.relative_to(PKG)}:{line}: {FLOORS[mine]} imports {name} ({FLOORS[theirs]})")
    assert not offenders, "imports that run up the house:\n" + "\n".join(offenders)


def test_the_floor_rule_sees_an_import_that_runs_up():
    assert _floor("ellama_recipes.engine.blocks") < _floor("ellama_recipes.workflows.launch")
    assert [n for _, n in all_imports("def f():\n    from ellama_recipes.cli.app import app\n", "ellama_recipes.io")
            if (_floor(n) or 0) > _floor("ellama_recipes.io.metrics")] == ["ellama_recipes.cli.app",
                                                                            "ellama_recipes.cli.app.app"]
