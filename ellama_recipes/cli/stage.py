"""What every training-stage command does after building its config: dry run or launch (stage-agnostic).

``ellama pretrain`` (and ``ellama align`` stages) build their config with their recipe's ``build_config`` and call
:func:`execute`. Everything stage-specific comes from the registry (``get_recipe(cfg.stage)``).
"""

from __future__ import annotations

import contextlib
import sys

from rich.table import Table

from ellama_recipes.cli.common import console, print_json
from ellama_recipes.errors import UserError


def execute(cfg, *, dryrun: bool, as_json: bool) -> None:
    """``--dryrun``: validate, print the resolved plan and the launch, run nothing. Else: check once (the inputs,
    fast, before NeMo is imported; the config for this host; the launch environment), launch, print the result."""
    if dryrun:
        cfg.validate()
        _dryrun(cfg, as_json=as_json)
        return
    if as_json:
        raise UserError(f"--json only applies with --dryrun (e.g. `ellama {cfg.stage} --size {cfg.size} --dryrun --json`).")
    _launch(cfg)


def _launch(cfg) -> None:
    from ellama_recipes.workflows import launch

    recipe = launch.check(cfg)  # input files first and fast, then everything this host cannot run
    partial = recipe.build_partial(cfg)
    if cfg.cluster.executor == "slurm":
        plan = launch.write_sbatch(cfg, launch.render(cfg, partial))
        console.print(f"sbatch script: {plan.script_file}")
    result = launch.start(cfg, partial)
    # Plain lines, not a box: paths stay whole (copyable) on any terminal width.
    console.print(f"[bold green]{cfg.stage} finished[/]")
    for k, v in result.items():
        console.print(f"  {k}: {v}", markup=False, highlight=False, soft_wrap=True)


def _dryrun(cfg, *, as_json: bool) -> None:
    from ellama_recipes.workflows import launch
    from ellama_recipes.workflows.plan import compute_plan
    from ellama_recipes.recipes import get_recipe

    # NeMo prints banners and warnings while building: keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        partial = get_recipe(cfg.stage).build_partial(cfg)
        plan = launch.render(cfg, partial)
    summary = cfg.summary()
    memory = compute_plan(cfg)["memory_per_gpu_gib"]
    if as_json:
        print_json({**summary, "memory_per_gpu_gib": memory, "launch": plan.as_dict(), "config": cfg.to_dict()})
        return
    table = Table(title=f"ellama {cfg.stage} --size {cfg.size}: resolved plan", show_lines=False)
    table.add_column("key", style="cyan")
    table.add_column("value")
    for k, v in summary.items():
        table.add_row(k, _fmt(v))
    table.add_row("memory_per_gpu_gib", ", ".join(f"{k} {v}" for k, v in memory.items()))
    console.print(table)
    if plan.script:
        # Raw (no box): copyable from any terminal. The launch also writes it to a file.
        console.print("[bold]sbatch script (slurm executor)[/]; a launch writes it to "
                      f"{launch.job_dir(cfg)}/{cfg.experiment_name}.sbatch:")
        console.print(plan.script, markup=False, highlight=False, soft_wrap=True)
    elif plan.command:
        console.print("[bold]torchrun command (local executor):[/]")
        console.print(plan.command, markup=False, highlight=False, soft_wrap=True)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    console.print("[dim]Dry run: nothing was launched.[/]")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)
