"""`ellama align`: SFT then DPO (not yet available)."""

from ellama_recipes.cli.common import not_yet
from ellama_recipes.cli.app import app


@app.command(
    "align",
    help="SFT then DPO, chained, from a continued-pretraining checkpoint.\n\nExample:  ellama align --from runs/cpt --out runs/aligned",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def align() -> None:
    not_yet("align", "SFT + DPO land in a later release")
