"""`ellama eval`: per-source perplexity and task suites, base vs adapted (not yet available)."""

from ellama_recipes.cli.common import not_yet
from ellama_recipes.cli.app import app


@app.command(
    "eval",
    help="Per-source validation perplexity and small task suites, base vs adapted.\n\nExample:  ellama eval --base checkpoints/tiny --adapted runs/cpt",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def evaluate() -> None:
    not_yet("eval", "evaluation lands in a later release")
