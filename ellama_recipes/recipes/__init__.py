"""Recipe registry: a recipe is a plain function ``(cfg) -> nemo_run.Partial``, registered by name.

Sizes are looked up in :mod:`ellama_recipes.sizes`; an unknown size lists the valid ones (a UserError).
"""

from __future__ import annotations

from typing import Any, Callable

from ellama_recipes.errors import UserError

RECIPES: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        RECIPES[name] = fn
        return fn

    return deco


def get_recipe(name: str) -> Callable[..., Any]:
    from ellama_recipes.recipes import pretrain  # noqa: F401  (registers)

    if name not in RECIPES:
        raise UserError(f"Unknown recipe {name!r}. Registered recipes: {', '.join(sorted(RECIPES))}.")
    return RECIPES[name]
