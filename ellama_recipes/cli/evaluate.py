"""`ellama eval`: per-source perplexity and lm-evaluation-harness task suites, baseline vs adapted models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ellama_recipes.cli.app import app
from ellama_recipes.cli.common import console, print_json
from ellama_recipes.errors import UserError

HELP = """Did the adaptation pay? Domain gain and general regression of HF models against the first --model.

Per model: perplexity per source on held-out text (--data: a blend manifest's validation split, the documents
pretraining validates on; or domain=FILE.jsonl / general=FILE.jsonl with {"text","lang"} lines), pooled as domain,
general, general_en, general_non_en; and task suites through lm-evaluation-harness (--tasks: `bundled` = the
e-commerce tasks product classification, attribute extraction, title generation, review sentiment plus general
English and multilingual continuation; a task YAML file; any harness task name; `none`). A task is a domain task
when its YAML has metadata: {side: domain}; its score is the first higher-is-better metric of its metric_list.

Definitions (base = the first --model; D, G = macro-average, i.e. unweighted mean, of the task scores over the
domain tasks and over the general tasks):
domain_gain_pct = 100 * (D(m) - D(base)) / D(base);
general_regression_pct = 100 * (G(base) - G(m)) / G(base) (positive = general ability lost).
Perplexity-based when no task of that side was run:
domain_gain_pct = 100 * (PPL_domain(base) - PPL_domain(m)) / PPL_domain(base);
general_regression_pct = 100 * (PPL_general(m) - PPL_general(base)) / PPL_general(base).

Writes OUT/eval.json and OUT/eval.png (the two numbers per model). --run RUN draws the forgetting curve
(val_loss_domain and val_loss_general against step) of a pretraining run folder to OUT/forgetting.png instead.

Example:  ellama eval --model .quickstart/base_hf --model .quickstart/hf --data .quickstart/data/manifest.json --out eval

Example:  ellama eval --run .quickstart/cpt --out eval
"""


def _reflow(text: str) -> str:
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


@app.command("eval", help=_reflow(HELP))
def evaluate(
    model: list[Path] = typer.Option([], "--model", help="HF model directory; repeat. The first is the baseline."),
    data: list[str] = typer.Option([], "--data", help="Blend manifest.json, or domain=FILE.jsonl / general=FILE.jsonl; repeat."),
    tasks: list[str] = typer.Option([], "--tasks", help="bundled (default), none, a bundled task, a task YAML, or a harness task name; repeat."),
    out: Path = typer.Option(Path("eval"), "--out", help="Folder for eval.json and eval.png (or forgetting.png with --run)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Pretraining run folder: draw its forgetting curve."),
    split: str = typer.Option("990,10,0", "--split", help="Megatron split of the manifest's sources (the 2nd part is validation)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N examples per task (quick checks)."),
    max_docs: int = typer.Option(200, "--max-docs", help="At most N validation documents per source."),
    batch_size: int = typer.Option(16, "--batch-size", help="Batch size for the harness and perplexity."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the models, tasks and text sources; evaluate nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    if run is not None:
        from ellama_recipes.io.charts import ChartError, FORGETTING_PNG, forgetting_curve

        try:
            png = forgetting_curve(run, out / FORGETTING_PNG)
        except ChartError as exc:
            raise UserError(f"--run {run}: {exc}") from None
        if as_json:
            print_json({"forgetting_png": str(png)})
        else:
            console.print(f"[green]forgetting curve[/] -> {png}")
        return
    if not model:
        raise UserError("Pass --model DIR (repeat it: the first is the baseline), or --run RUN for a forgetting curve.")
    from ellama_recipes.workflows import evaluate as ev

    if dryrun:
        for d in model:
            ev.check_model_dir(d)
        refs = ev.resolve_tasks(tasks)
        plan = {"baseline": str(model[0]), "models": [str(m) for m in model],
                "tasks": [{"name": t.name, "side": t.side, "origin": t.origin} for t in refs],
                "data": list(data), "out": [str(out / "eval.json"), str(out / "eval.png")],
                "definitions": ev.DEFINITIONS}
        if as_json:
            print_json(plan)
        else:
            console.print(plan)
            console.print("[dim]Dry run: nothing was evaluated.[/]")
        return
    echo = (lambda msg: None) if as_json else (lambda msg: console.print(msg, highlight=False))
    report = ev.evaluate(model, data=data, tasks=tasks, out=out, split=split, limit=limit, batch_size=batch_size,
                         max_docs=max_docs, echo=echo)
    if as_json:
        print_json(report)
        return
    console.print(report_table(report))
    console.print(f"[green]wrote[/] {out / 'eval.json'} and {out / 'eval.png'}")


def report_table(report: dict, title: str = "ellama eval") -> Table:
    """One row per model: domain/general scores, pooled perplexities and the two numbers."""
    table = Table(title=f"{title} (baseline: {report['baseline']})")
    for col in ("model", "domain score", "general score", "ppl domain", "ppl general", "ppl gen. non-en",
                "domain gain %", "general regr. %"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    for e in report["models"]:
        pooled = (e.get("perplexity") or {}).get("pooled", {})
        table.add_row(
            e["label"], f(e.get("domain_score")), f(e.get("general_score")),
            f(pooled.get("domain", {}).get("ppl"), "{:.2f}"), f(pooled.get("general", {}).get("ppl"), "{:.2f}"),
            f(pooled.get("general_non_en", {}).get("ppl"), "{:.2f}"),
            "baseline" if e is report["models"][0] else f(e.get("domain_gain_pct"), "{:+.2f}"),
            "baseline" if e is report["models"][0] else f(e.get("general_regression_pct"), "{:+.2f}"),
        )
    return table
