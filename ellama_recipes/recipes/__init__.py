"""The stage-recipe registry: one :class:`Recipe` per training stage (pretrain, sft, dpo ...).

A stage is three files:

- ``ellama_recipes/recipes/<stage>.py``: its config class (a :class:`ellama_recipes.config.schema.TrainConfig`
  subclass with ``stage = "<stage>"``), its defaults (``build_config``), its input checks, what its summary reports,
  and ``register(Recipe(...))``. It imports ``ellama_recipes.engine`` only inside ``build_partial`` (so dry runs of
  the config stay fast);
- ``ellama_recipes/engine/<stage>.py``: builds the ``nemo_run.Partial`` from the shared engine blocks
  (:mod:`ellama_recipes.engine.blocks`) and holds the entry function every rank runs;
- the command that runs it: ``ellama pretrain`` (:mod:`ellama_recipes.cli.pretrain`) or ``ellama align``
  (:mod:`ellama_recipes.workflows.align`), through :mod:`ellama_recipes.workflows.launch`, which knows no stage.

Every module in this package is imported by :func:`get_recipe` / :func:`recipes` (no list to edit).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """A registered training stage.

    - ``name``: the registry key and CLI command (``"pretrain"``); equals its config class's ``stage``.
    - ``run_name`` (its config class's): short name for checkpoint files (``RUN/checkpoints/<run_name>--step=...``),
      NeMo's log name and the NeMo-Run experiment (``cfg.experiment_name``: ``ellama-<run_name>-<size>``).
    - ``config_cls``: the stage's :class:`~ellama_recipes.config.schema.TrainConfig` subclass.
    - ``build_config(size, **flags, overrides=[...]) -> config``: the stage's defaults, flags, overrides.
    - ``build_partial(config) -> nemo_run.Partial``: the whole run (model, data, trainer, log, optim, resume) through
      the engine; it must write ``RUN/metrics.jsonl`` and resume from ``RUN/checkpoints`` itself (launched ranks run
      nothing else), and its entry function must call ``engine.runner.prepare_rank()`` first.
    - ``check_inputs(config) -> [problems]``: fast file checks before anything heavy is imported (bad paths fail
      in well under two seconds).
    - ``summary``: what the stage's summary reports, read off ``RUN/metrics.jsonl`` by :meth:`summarize`:
      ``{"step_key": <the training rows' key>, "fields": {name: ("first" | "last", metrics key)}}``. The partial
      carries it (:meth:`report`) so every launched rank 0 writes the same summary into ``RUN/complete.json``.
    """

    name: str
    config_cls: type
    build_config: Callable[..., Any]
    build_partial: Callable[[Any], Any]
    check_inputs: Callable[[Any], list[str]] = lambda cfg: []
    summary: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def run_name(self) -> str:
        return self.config_cls.run_name

    def report(self) -> dict[str, Any]:
        """The summary spec the stage's entry function writes ``RUN/complete.json`` with."""
        return {"stage": self.name, "step_key": self.summary["step_key"], "fields": dict(self.summary["fields"])}

    def summarize(self, run_dir: str | Path) -> dict[str, Any]:
        """The stage's summary of a run folder (:func:`ellama_recipes.io.run_folder.summarize`)."""
        from ellama_recipes.io.run_folder import summarize

        return summarize(run_dir, self.name, self.summary["fields"], step_key=self.summary["step_key"])


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    if getattr(recipe.config_cls, "stage", None) != recipe.name:
        raise ValueError(f"recipe {recipe.name!r}: {recipe.config_cls.__name__}.stage must be {recipe.name!r}")
    RECIPES[recipe.name] = recipe
    return recipe


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def recipes() -> dict[str, Recipe]:
    """Every registered stage recipe, by name."""
    _load_all()
    return dict(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe of stage ``name`` (or of a config: ``get_recipe(cfg.stage)``); unknown names are a UserError."""
    if name not in RECIPES:
        _load_all()
    if name not in RECIPES:
        raise UserError(f"Unknown recipe {name!r}. Registered recipes: {', '.join(sorted(RECIPES))}.")
    return RECIPES[name]


def check_checkpoint_dir(path: str | None, *, size: str, flag: str = "--from") -> list[str]:
    """Fast check that ``path`` (when set) is an engine checkpoint folder (weights/ and context/ inside)."""
    if not path:
        return []
    p = Path(path)
    if not p.exists():
        return [f"{flag} {path}: no such checkpoint. Create one with `ellama import-hf --size {size} --out DIR`."]
    if not ((p / "weights").is_dir() and (p / "context").is_dir()):
        return [
            f"{flag} {path} is not an engine checkpoint (expected weights/ and context/ inside). "
            f"Fix: create one with `ellama import-hf --size {size} --out DIR` and pass {flag} DIR."
        ]
    return []
