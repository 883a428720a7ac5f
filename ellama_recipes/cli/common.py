"""Shared CLI helpers: console, JSON output, stub commands."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from ellama_recipes.errors import UserError

console = Console()
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (no rich markup, machine-readable)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def not_yet(command: str, issue: str) -> None:
    raise UserError(
        f"`ellama {command}` is not yet available in this version ({issue}). "
        "Run `ellama --help` to see the commands that are."
    )
