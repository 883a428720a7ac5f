"""`ellama data ...`: prepare, classify, tokenize and blend training data (owned by the data pipeline)."""

import typer

from ellama_recipes.cli.common import not_yet
from ellama_recipes.cli.main import app

data_app = typer.Typer(
    help="Prepare and blend domain and general data into Megatron indexed datasets.\n\n"
    "Example:  ellama data build --domain raw/domain --general raw/general --tokenizer tok/ --out data/",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command("build", help="Run every data stage.\n\nExample:  ellama data build --domain d/ --general g/ --tokenizer tok/ --out data/")
def build() -> None:
    not_yet("data build", "in progress")
