"""The one ``key=value`` override engine: dotted keys, typed by the field, applied after a recipe is built.

Precedence (lowest to highest): the size table -> the stage recipe's defaults -> CLI flags -> ``key=value``
overrides (DESIGN practice 4). Every bad override is reported at once, with close matches for unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from ellama_recipes.errors import UserError


def config_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key an override may set."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys.extend(config_keys(value, name + "."))
        else:
            keys.append(name)
    return keys


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` overrides (dotted keys, typed by the field). Every bad one is reported at once."""
    problems: list[str] = []
    valid = config_keys(cfg)
    for item in overrides:
        if "=" not in item:
            problems.append(
                f"{item!r} is not a key=value override (e.g. schedule.lr_fraction=0.05). "
                f"Flags go before the overrides: check the spelling with `--help`."
            )
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            if not close:  # match on the last component too (e.g. `lr_fraction` -> schedule.lr_fraction)
                close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
            hint = f" Did you mean: {', '.join(close)}?" if close else " Run with --dryrun --json to see the keys."
            problems.append(f"Unknown config key {key!r}.{hint}")
            continue
        parent = cfg
        *path, leaf = key.split(".")
        for part in path:
            parent = getattr(parent, part)
        ftype = {f.name: f.type for f in dataclasses.fields(parent)}[leaf]
        hints = typing.get_type_hints(type(parent))
        try:
            setattr(parent, leaf, _coerce(raw.strip(), hints.get(leaf, ftype)))
        except ValueError as exc:
            problems.append(f"{key}={raw!r}: {exc}")
    if problems:
        raise UserError(f"{len(problems)} bad override(s):", problems=problems)
    return cfg


def _coerce(raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(raw, a)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        return raw
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(float(raw)) if float(raw).is_integer() else int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    raise ValueError(f"cannot set a field of type {tp}")


def from_dict(cls: Any, d: dict[str, Any]) -> Any:
    """``cls`` (a config dataclass) from ``dataclasses.asdict`` output, nested specs typed by their annotations."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp = hints[f.name]
        kwargs[f.name] = from_dict(tp, d[f.name]) if dataclasses.is_dataclass(tp) else d[f.name]
    return cls(**kwargs)
