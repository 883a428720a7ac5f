"""`ellama align`: SFT then DPO, chained, from a continued-pretraining checkpoint (ellama_recipes.workflows.align)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ellama_recipes.cli.app import app
from ellama_recipes.cli.common import console, err_console, print_json

HELP = """SFT then DPO, chained, from a continued-pretraining checkpoint, on the same NeMo/Megatron engine.

--from takes an engine checkpoint or a pretraining run folder (its latest complete checkpoint, as export-hf does).
SFT data: JSONL/Parquet rows {"messages": [{"role", "content"}, ...]} or {"prompt", "response"} (loss on assistant
tokens only). DPO data: rows {"prompt" | "messages", "chosen", "rejected"}. Repeat --sft / --dpo for several files or
folders. Bad rows are counted with reason and file:line in RUN2/{sft,dpo}/data/rejects.jsonl. Stages run in RUN2/sft
and RUN2/dpo (checkpoints/, metrics.jsonl, logs/); `ellama export-hf --from RUN2/dpo` exports the result. Re-running
the same command skips finished stages and resumes an interrupted one from its last complete checkpoint.
Overrides: sft.KEY=V (SFT only), dpo.KEY=V (DPO only), KEY=V (both); see the keys with --dryrun --json.

Examples:

  ellama align --size 70b --from runs/cpt --sft data/sft --dpo data/pref --out runs/aligned --dryrun --json

  ellama align --size 8b --from runs/cpt --sft data/sft --dpo data/pref --out runs/aligned --executor slurm cluster.slurm_account=llm --dryrun

  ellama align --size tiny --from runs/cpt --sft ellama_recipes/sample_data/sft --dpo ellama_recipes/sample_data/preference --out runs/aligned --sft-steps 30 --dpo-steps 20
"""


@app.command(
    "align",
    help=HELP,
    context_settings={"allow_extra_args": False, "ignore_unknown_options": False},
)
def align(
    size: str = typer.Option(..., "--size", "-s", help="Model size: tiny, 8b, 70b or 405b."),
    from_path: Path = typer.Option(..., "--from", help="Engine checkpoint or pretraining run folder (latest complete checkpoint)."),
    sft: List[Path] = typer.Option(..., "--sft", help="SFT data: .jsonl/.parquet file(s) or folder(s); repeat the flag."),
    dpo: List[Path] = typer.Option(..., "--dpo", help="Preference data: .jsonl/.parquet file(s) or folder(s); repeat the flag."),
    out: Path = typer.Option(..., "--out", help="RUN2: the stages run in RUN2/sft and RUN2/dpo."),
    sft_steps: Optional[int] = typer.Option(None, "--sft-steps", help="SFT steps (default: data.epochs x rows / global batch)."),
    dpo_steps: Optional[int] = typer.Option(None, "--dpo-steps", help="DPO steps (default: the DPO recipe's)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (both stages)."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Number of nodes (default: each stage recipe's)."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default 8)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (this node) or slurm (one sbatch job per stage)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print both stages' resolved plans and launches; run nothing."),
    as_json: bool = typer.Option(False, "--json", help='With --dryrun: print {"sft": {...}, "dpo": {...}}.'),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides: sft.KEY=V, dpo.KEY=V or KEY=V (both)."),
) -> None:
    from ellama_recipes.workflows import align as chain
    from ellama_recipes.errors import UserError

    for name, value in (("--sft-steps", sft_steps), ("--dpo-steps", dpo_steps), ("--save-every", save_every)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be a positive integer.")
    req = chain.AlignRequest(
        size=size, from_path=str(from_path), sft=[str(p) for p in sft], dpo=[str(p) for p in dpo], out=str(out),
        sft_steps=sft_steps, dpo_steps=dpo_steps, save_every=save_every, nodes=nodes, gpus_per_node=gpus_per_node,
        executor=executor, overrides=list(overrides or []),
    )
    if dryrun:
        plan = chain.dryrun(req)
        if as_json:
            print_json(plan)
        else:
            _show_plan(plan)
        return
    if as_json:
        raise UserError("--json only applies with --dryrun (e.g. `ellama align ... --dryrun --json`).")
    results = chain.run(req, echo=lambda m: err_console.print(m, highlight=False, markup=False),
                        show_table=_show_table)
    _show_results(results)


def _show_table(reports) -> None:
    from ellama_recipes.data.chat import report_table

    console.print(report_table(reports))


def _show_plan(plan: dict) -> None:
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table

    from ellama_recipes.workflows.align import DRYRUN_KEYS

    t = Table(title="ellama align: resolved plan")
    t.add_column("key", style="cyan")
    for stage in plan:
        t.add_column(stage)
    keys = list(DRYRUN_KEYS) + ["beta", "sft_loss_weight", "warmup_steps", "num_nodes", "lr_source", "restore_from",
                                "run_dir"]
    for k in keys:
        t.add_row(k, *[_fmt(plan[s].get(k, "-")) for s in plan])
    console.print(t)
    for stage, p in plan.items():
        launch = p["launch"]
        if launch.get("script"):
            console.print(Panel(Syntax(launch["script"], "bash", word_wrap=True), title=f"{stage}: sbatch script"))
        elif launch.get("command"):
            console.print(Panel(launch["command"], title=f"{stage}: torchrun command"))
        for note in launch.get("notes", []):
            console.print(f"[yellow]{stage} note:[/] {note}")
    console.print("[dim]Dry run: nothing was prepared or launched.[/]")


def _show_results(results: dict) -> None:
    from rich.panel import Panel

    lines = []
    for stage, r in results.items():
        if r.get("launched"):
            lines.append(f"{stage}: launched {r['launched']}")
            continue
        s = r.get("summary") or {}
        state = "skipped (already complete)" if r.get("skipped") else "done"
        lines.append(f"{stage}: {state}, checkpoint {r.get('checkpoint')}")
        if r.get("job_dir"):
            lines.append(f"  launched ({r.get('state')}), job folder {r['job_dir']}")
        if stage == "sft" and s.get("final_loss") is not None:
            lines.append(f"  loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, val_loss "
                         f"{_fmt(s.get('first_val_loss'))} -> {_fmt(s.get('final_val_loss'))}")
        elif s:
            shown = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if shown:
                lines.append("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    console.print(Panel.fit("\n".join(lines) or "nothing to do", title="align"))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
