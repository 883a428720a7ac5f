"""`ellama sweep`: LR fraction x mix ratio, one continued-pretraining run per point, as one NeMo-Run experiment."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.panel import Panel
from rich.table import Table

from ellama_recipes.cli.app import app
from ellama_recipes.cli.common import console

HELP = (
    "Choose the knobs before the big run: sweep the max-LR fraction x the general:domain mix ratio.\n\n"
    "Every grid point is one continued-pretraining run of the registered pretrain recipe with two knobs changed "
    "(schedule.lr_fraction and the blend, re-weighted from the already tokenized sources), in OUT/runs/<name>/; the "
    "runs form one NeMo-Run experiment (local: one at a time or --parallel K; Slurm: one job per point). The --from "
    "checkpoint's per-source validation losses are measured first (OUT/base). At the end: OUT/sweep.json, "
    "OUT/sweep.png (general loss increase vs domain loss decrease, Pareto front) and a table with the recommended "
    "point: the largest domain gain whose general regression stays within --max-regression (default 1%). Re-running "
    "the same command skips finished points and resumes unfinished ones. Trailing key=value pairs override the "
    "recipe for every point.\n\n"
    "Examples:\n\n"
    "  ellama sweep --size 8b --from ckpt/8b --data data/manifest.json --out sweep/ --lr-fraction 0.05,0.1,0.2 "
    "--ratio 4:1,1:1,1:4 --steps 2000 --executor slurm cluster.slurm_account=llm --dryrun\n\n"
    "  ellama sweep --size tiny --from .quickstart/base --data .quickstart/data/manifest.json --out sweep/ "
    "--lr-fraction 0.1,0.2 --ratio 4:1,1:4 --steps 20\n"
)


@app.command("sweep", help=HELP)
def sweep(
    size: str = typer.Option(..., "--size", "-s", help="Model size: tiny, 8b, 70b or 405b."),
    from_ckpt: Optional[Path] = typer.Option(None, "--from", help="Engine checkpoint every run continues from."),
    data: Optional[Path] = typer.Option(None, "--data", help="manifest.json of `ellama data build` (re-blended per ratio)."),
    data_domain: Optional[List[Path]] = typer.Option(None, "--data-domain", help="Domain inputs (build the data once)."),
    data_general: Optional[List[Path]] = typer.Option(None, "--data-general", help="General inputs (build the data once)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer for --data-domain/--data-general."),
    out: Path = typer.Option(..., "--out", help="Sweep folder: runs/, blends/, base/, sweep.json, sweep.png."),
    lr_fraction: List[str] = typer.Option(["0.05,0.1,0.2"], "--lr-fraction", help="Max-LR fractions, comma-separated."),
    ratio: List[str] = typer.Option(["4:1,1:1,1:4"], "--ratio", help="general:domain token ratios, comma-separated."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per run (default: the recipe's)."),
    executor: str = typer.Option("local", "--executor", help="local or slurm."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Runs at a time (local default 1; Slurm: all)."),
    max_regression: str = typer.Option("1", "--max-regression", help="General-loss regression budget in %, e.g. 1 or 0.5%."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the grid, config differences, tokens and GPU-hours."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for every run."),
) -> None:
    from ellama_recipes.workflows import sweep as S

    spec = S.SweepSpec(
        size=size,
        restore_from=from_ckpt,
        out=out,
        lr_fractions=S.parse_lr_fractions(lr_fraction),
        ratios=S.parse_ratios(ratio),
        data=data,
        data_domain=list(data_domain or []),
        data_general=list(data_general or []),
        tokenizer=tokenizer,
        steps=steps,
        executor=executor,
        parallel=parallel,
        max_regression_pct=S.parse_max_regression(max_regression),
        overrides=list(overrides or []),
    )
    if dryrun:
        _print_dryrun(S.dryrun_plan(spec))
        return
    result = S.run_sweep(spec, echo=lambda msg: console.print(f"[cyan]sweep[/] {msg}", highlight=False))
    console.print(result_table(result))
    if result["recommended"]:
        console.print(f"[bold green]recommended:[/] {result['recommended']}: {result['recommendation']}")
    else:
        console.print(f"[bold yellow]no recommendation:[/] {result['recommendation']}")
    console.print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    if result["unfinished"]:
        if spec.executor == "slurm":
            console.print(f"{len(result['unfinished'])} point(s) submitted or unfinished; re-run the same command "
                          "when the jobs have ended to collect them.")
            return
        console.print(f"[bold red]{len(result['unfinished'])} point(s) did not finish:[/] "
                      f"{', '.join(result['unfinished'])}. Their logs: {result['launched'].get('log_dir')}. "
                      "Re-run the same command to resume them.")
        raise typer.Exit(1)


def _f(v, fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def _v(x) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def _tokens(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def result_table(result: dict) -> Table:
    """Per run: final losses and their change from the base model; * marks the recommended run."""
    base = result["base"]
    t = Table(title=f"ellama sweep: base model domain {_f(base['val_loss_domain'])}, general "
                    f"{_f(base['val_loss_general'])}; budget {result['max_regression_pct']:g}%", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1))
    t.caption = "domain / gen.: final validation losses; gain / regr.: change from the base; PF: Pareto front"
    for col in ("run", "status", "domain", "gain", "gen.", "regr.", "tokens", "wall", "PF"):
        t.add_column(col, justify="left" if col in ("run", "status") else "right", no_wrap=True)
    for e in result["points"]:
        d, g = e["val_loss_domain"], e["val_loss_general"]
        rec = e["name"] == result["recommended"]
        t.add_row(
            f"[bold green]{e['name']}*[/]" if rec else e["name"], "done" if e["status"] == "finished" else e["status"],
            _f(d["final"]), _f(e["domain_gain_pct"], "{:+.2f}%"),
            _f(g["final"]), _f(e["general_regression_pct"], "{:+.2f}%"),
            _tokens(e["tokens_seen"]), _f(e["wall_time_s"], "{:.0f}s"), "y" if e["pareto"] else "",
        )
    return t


def _print_dryrun(plan: dict) -> None:
    t = Table(title=f"ellama sweep --size {plan['size']}: {plan['runs']} runs ({plan['executor']}, "
                    f"{plan['parallel']} at a time)", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("run", "lr frac", "lr", "g:d", "status", "steps", "tokens", "GPU-hours"):
        t.add_column(col, justify="left" if col in ("run", "status") else "right", no_wrap=True)
    for p in plan["points"]:
        status = p["status"] + (f" (step {p['last_step']})" if p["status"] == "partial" else "")
        t.add_row(p["name"], f"{p['lr_fraction']:g}", f"{p['lr']:.3g}", p["ratio"], status, f"{p['steps']:,}",
                  _tokens(p["tokens"]), f"{p['gpu_hours']:,.4g}")
    console.print(t)
    d = Table(title="per-run config differences from the recipe (key: recipe -> run)", box=box.SIMPLE_HEAD,
              pad_edge=False, show_edge=False)
    d.add_column("run", no_wrap=True)
    d.add_column("differences")
    for p in plan["points"]:
        d.add_row(p["name"], "\n".join(f"{k}: {_v(a)} -> {_v(b)}" for k, (a, b) in p["differences"].items()))
    console.print(d)
    console.print(f"total tokens: {plan['total_tokens']:,}   GPU-hours (ellama plan, {plan['tflops_per_gpu']:g} "
                  f"TFLOP/s/GPU): {plan['total_gpu_hours']:,.6g}")
    console.print(f"data: {plan['data']};  {plan['base_pass']}")
    if plan["launch"]:
        first = next(n for n in plan["launch"] if n != "base")
        kind = "sbatch script" if plan["executor"] == "slurm" else "command"
        console.print(Panel(plan["launch"][first], title=f"{kind} of {first} (one per run, {len(plan['launch'])} "
                                                         "with the base pass; NeMo-Run writes them at launch)"))
    console.print("[dim]Dry run: nothing was built or launched.[/]")
