"""`ellama quickstart`: the whole chain on the tiny size and the bundled sample data, on CPU."""

from ellama_recipes.cli.common import not_yet
from ellama_recipes.cli.main import app


@app.command("quickstart", help="The whole chain (data -> import -> pretrain -> export) on the tiny model and bundled sample data, on CPU.\n\nExample:  ellama quickstart --out .quickstart")
def quickstart() -> None:
    not_yet("quickstart", "in progress")
