"""Entry point of the `ellama` console script.

Every command group lives in its own module and registers itself on ``app``
(:mod:`ellama_recipes.cli.app`). User mistakes raise
:class:`ellama_recipes.errors.UserError`; :func:`main` prints them as one paragraph on stderr and exits 2.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.2x vendors its own click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException

from ellama_recipes.cli.app import app
from ellama_recipes.errors import EXIT_USAGE, UserError


def _register() -> None:
    # Imported here so `ellama --help` stays fast: command modules import heavy engines lazily inside commands.
    from ellama_recipes.cli import align, data, evaluate, import_export, merge, plan, pretrain, quickstart, sweep  # noqa: F401


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by tests)."""
    try:
        # click returns the code of a `typer.Exit(code)` here instead of raising it (standalone_mode=False)
        code = app(args=argv, prog_name="ellama", standalone_mode=False)
    except UserError as exc:
        from ellama_recipes.cli.common import err_console

        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except typer.Exit as exc:
        return exc.exit_code
    except ClickException as exc:  # usage errors: bad flag, missing option (click's exit code 2)
        exc.show()
        return exc.exit_code
    except typer.Abort:
        return 130
    except KeyboardInterrupt:
        return 130
    return code if type(code) is int else 0


if __name__ == "__main__":
    sys.exit(main())
