"""`ellama quickstart`: the whole chain on the tiny size and the bundled sample data, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ellama_recipes.cli.common import console, print_json
from ellama_recipes.cli.app import app

HELP = """The whole chain on the tiny model and the bundled sample data, on CPU, in minutes.

tiny base model + tokenizer (built locally) -> import-hf -> data build (clean, graph mix, tokenize, blend 1:1)
-> pretrain (continued pretraining, per-source validation) -> export-hf (verified) -> generate with transformers.
Completed stages under --out are reused; --fresh starts over.

Example:  ellama quickstart --out .quickstart
"""


@app.command("quickstart", help=HELP)
def quickstart(
    out: Path = typer.Option(Path(".quickstart"), "--out", help="Working directory for every stage's output."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Pretraining steps (default: the tiny recipe's 40)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete --out first and run every stage."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the stages and their commands; run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    from ellama_recipes.quickstart import describe, run_quickstart

    if dryrun:
        stages = describe(out, steps)
        if as_json:
            print_json({"out": str(out), "stages": stages})
            return
        table = Table(title="ellama quickstart --dryrun")
        for col in ("stage", "output", "command"):
            table.add_column(col, overflow="fold")
        for st in stages:
            table.add_row(st["stage"], st["output"], st["command"])
        console.print(table)
        console.print("[dim]Dry run: nothing was run.[/]")
        return

    echo = (lambda msg: console.print(msg, highlight=False)) if not as_json else (lambda msg: None)
    summary = run_quickstart(out, steps=steps, fresh=fresh, echo=echo)
    if as_json:
        print_json(summary)
        return
    table = Table(title="ellama quickstart")
    table.add_column("stage", style="cyan")
    table.add_column("output")
    table.add_column("seconds", justify="right")
    for st in summary["stages"]:
        table.add_row(st["name"], st["output"], "reused" if st["reused"] else f"{st['seconds']:.1f}")
    console.print(table)
    m = summary["metrics"]
    for key in ("train_loss", "val_loss_domain", "val_loss_general"):
        if key in m:
            console.print(
                f"{key}: {m[key]['first']:.4f} (step {m[key]['first_step']}) -> {m[key]['last']:.4f} (step {m[key]['last_step']})"
            )
    console.print(f"generation: {summary['generation']['text']!r}")
    console.print(f"[bold green]done:[/] Hugging Face model in {summary['hf_dir']}")
