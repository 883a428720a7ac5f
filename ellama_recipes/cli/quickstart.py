"""`ellama quickstart`: the whole chain on the tiny size and the bundled sample data, on CPU, with the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ellama_recipes.cli.app import app
from ellama_recipes.cli.common import console, print_json

HELP = """The whole chain on the tiny model and the bundled sample data, on CPU, in minutes, with the answer.

tiny base (built locally, pretrained briefly on the bundled general text, cached) -> import-hf -> data build
(clean, graph mix, tokenize, blend 1:1) -> pretrain (continued pretraining, per-source validation, forgetting curve)
-> export-hf (verified) -> align (SFT then DPO, when `ellama align` is available) -> export-hf -> eval (base vs CPT vs
aligned: perplexity per source and the bundled task suites). Prints each stage's wall time and the two numbers,
domain_gain_pct and general_regression_pct of the final model against the base (definitions: `ellama eval --help`),
and writes OUT/report.json. Completed stages under --out are reused; --fresh starts over.

Example:  ellama quickstart --out .quickstart
"""


def _reflow(text: str) -> str:
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


def _f(x, fmt="{:+.2f}") -> str:
    return "-" if x is None else fmt.format(x)


@app.command("quickstart", help=_reflow(HELP))
def quickstart(
    out: Path = typer.Option(Path(".quickstart"), "--out", help="Working directory for every stage's output."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Continued-pretraining steps (default: the tiny recipe's)."),
    base_steps: int = typer.Option(150, "--base-steps", help="Steps of the tiny base's general-text pretraining."),
    align_steps: Optional[int] = typer.Option(None, "--align-steps", help="SFT and DPO steps each (default: the recipes')."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="At most N examples per eval task."),
    align: bool = typer.Option(True, "--align/--no-align", help="Run SFT + DPO after CPT (when `ellama align` exists)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete --out first and run every stage."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the stages and their commands; run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    from ellama_recipes.workflows.quickstart import describe, run_quickstart

    if dryrun:
        stages = describe(out, steps, align)
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
    summary = run_quickstart(out, steps=steps, base_steps=base_steps, align_steps=align_steps, eval_limit=eval_limit,
                             align=align, fresh=fresh, echo=echo)
    if as_json:
        print_json(summary)
        return
    m = summary["metrics"]
    for key in ("val_loss_domain", "val_loss_general"):
        if key in m:
            console.print(f"CPT {key}: {m[key]['first']:.4f} (step {m[key]['first_step']}) -> "
                          f"{m[key]['last']:.4f} (step {m[key]['last_step']})")
    console.print(f"generation ({summary['final_model']}): {summary['generation']['text']!r}")
    table = Table(title="ellama quickstart")
    table.add_column("stage", style="cyan")
    table.add_column("output")
    table.add_column("wall s", justify="right")
    total = 0.0
    for st in summary["stage_details"]:
        total += st["seconds"]
        table.add_row(st["name"], st["output"], "reused" if st["reused"] else f"{st['seconds']:.1f}")
    table.add_row("total", "", f"{total:.1f}", style="bold")
    console.print(table)
    ev = Table(title="base vs adapted (ellama eval; definitions: ellama eval --help)")
    for col in ("model", "domain score", "general score", "domain gain %", "general regr. %", "ppl domain",
                "ppl general", "ppl domain gain %", "ppl general regr. %"):
        ev.add_column(col, justify="left" if col == "model" else "right")
    for r in summary["eval"]:
        ev.add_row(r["model"], _f(r["domain_score"], "{:.3f}"), _f(r["general_score"], "{:.3f}"),
                   _f(r["domain_gain_pct"]), _f(r["general_regression_pct"]),
                   _f(r.get("ppl_domain"), "{:.1f}"), _f(r.get("ppl_general"), "{:.1f}"),
                   _f(r.get("ppl_domain_gain_pct")), _f(r.get("ppl_general_regression_pct")))
    console.print(ev)
    console.print(f"[bold]{summary['final_model']} vs base: domain_gain_pct {_f(summary['domain_gain_pct'])} %, "
                  f"general_regression_pct {_f(summary['general_regression_pct'])} %[/]")
    console.print(f"[bold green]done:[/] Hugging Face model in {summary['hf_dir']}; report {Path(summary['out']) / 'report.json'}")
