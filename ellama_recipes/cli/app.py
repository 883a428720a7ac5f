"""The Typer ``app`` of the `ellama` console script, alone in its module.

Command modules (``ellama_recipes.cli.<group>``) import ``app`` from here and register on it;
:mod:`ellama_recipes.cli.main` imports the command modules and runs the app. Nothing here imports a command
module, so there is no import circle between the app and its commands.
"""

from __future__ import annotations

import typer

from ellama_recipes import __version__

app = typer.Typer(
    name="ellama",
    help=(
        "Domain-adapt Llama 3.1 the e-Llama way: prepare and blend data, continued pretraining on NeMo/Megatron, "
        "SFT + DPO, export to Hugging Face.\n\n"
        "Example:  ellama pretrain --size 70b --nodes 60 --dryrun"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ellama-recipes {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass
