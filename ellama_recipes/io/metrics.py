"""``RUN/metrics.jsonl``: one JSON object per logged step, the one reader and the writers every stage uses.

Rows: ``step`` (optimizer steps done, 1-based; 0 = before any step, the base-model validation of ``ellama sweep``)
plus the stage's values (pretraining ``train_loss``, ``lr``, ``val_loss_domain`` / ``val_loss_general``; SFT and DPO
``stage``, ``loss`` ...). Rank 0 appends a row per step (:func:`append`, flushed and fsynced), adds validation values
to the row of the step they ran after (:func:`merge_step`) and, on resume, drops the rows a killed run wrote past its
last complete checkpoint (:func:`truncate_after`).

A torn last line: the only line a kill can leave half-written is the last one (each row is one write + fsync), so
:func:`read_metrics` ignores an unparsable LAST line, and the rewriters drop it. An unparsable line anywhere else is
not a kill but a damaged file: a :class:`~ellama_recipes.errors.UserError` naming ``file:line``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ellama_recipes.errors import UserError
from ellama_recipes.io.atomic import write_text

FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (or of ``RUN/metrics.jsonl`` when ``path`` is a folder), in file order.

    Missing file: ``[]``. A torn last line is ignored; a damaged line before it is a UserError (``file:line``).
    Rows are JSON objects with a ``step``; anything else is a damaged line too.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
        elif n == len(lines):
            break  # the torn last write of a killed run
        else:
            raise UserError(f"{path}:{n} is not a metrics row ({line[:80]!r}): the file is damaged. Fix: restore it, "
                            "or remove the run folder and train again.")
    return out


def append(path: str | Path, rec: dict[str, Any]) -> None:
    """Append one row and make it durable (a crash right after keeps it whole)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows), fsync=True)


def merge_step(path: str | Path, step: int, values: dict[str, Any]) -> None:
    """Add ``values`` to the row of ``step`` (appending one if absent); atomic rewrite."""
    path = Path(path)
    rows, done = read_metrics(path), False
    for rec in rows:
        if rec.get("step") == step and not done:
            rec.update(values)
            done = True
    if not done:
        rows.append({"step": step, **values})
    _rewrite(path, rows)


def truncate_after(path: str | Path, step: int) -> None:
    """Drop rows with ``step > step`` (and a torn last line); atomic rewrite. Nothing to do without the file."""
    path = Path(path)
    if path.exists():
        _rewrite(path, [r for r in read_metrics(path) if int(r.get("step", -1)) <= step])


def first(rows: list[dict[str, Any]], key: str) -> Any:
    """The first row's value of ``key`` among the rows that have it (None when none has)."""
    return next((r[key] for r in rows if r.get(key) is not None), None)


def last(rows: list[dict[str, Any]], key: str) -> Any:
    """The last row's value of ``key`` among the rows that have it (None when none has)."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def last_step(rows: list[dict[str, Any]], key: str) -> int | None:
    """The step of the last row that has ``key``."""
    return next((int(r["step"]) for r in reversed(rows) if r.get(key) is not None), None)
