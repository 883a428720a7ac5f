"""`ellama pretrain`: continued pretraining of Llama 3.1 (e-Llama recipe)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from ellama_recipes.cli.common import console, print_json
from ellama_recipes.cli.app import app

HELP = """Continued pretraining of Llama 3.1 on NeMo/Megatron (e-Llama recipe).

Max LR = lr_fraction (0.10) x the base model's max LR, linear warmup then cosine decay, global batch 1440 x 8192
tokens, 85,000 steps (~1T tokens), AdamW (0.9, 0.95), weight decay 0.1, grad clip 1.0, distributed optimizer,
flash attention, BF16 (or FP8 with --fp8 on H100). Trailing key=value pairs override any config field after the
recipe is built (precedence: size table < recipe defaults < flags < key=value); see the keys with --dryrun --json.

Examples:

  ellama pretrain --size 70b --dryrun

  ellama pretrain --size 8b --nodes 2 --fp8 --executor slurm cluster.slurm_account=llm --dryrun --json

  ellama pretrain --size tiny --from checkpoints/tiny --data data/manifest.json --out runs/cpt --steps 40
"""


@app.command(
    "pretrain",
    help=HELP,
    context_settings={"allow_extra_args": False, "ignore_unknown_options": False},
)
def pretrain(
    size: str = typer.Option(..., "--size", "-s", help="Model size: tiny, 8b, 70b or 405b."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Number of nodes (default: the size's default)."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default 8)."),
    fp8: bool = typer.Option(False, "--fp8", help="Transformer Engine FP8 (H100 or newer)."),
    fp8_recipe: Optional[str] = typer.Option(
        None, "--fp8-recipe", help="FP8 scaling: delayed (default) or current (per-tensor current scaling)."
    ),
    executor: Optional[str] = typer.Option(None, "--executor", help="local (torchrun on this node) or slurm."),
    from_ckpt: Optional[Path] = typer.Option(None, "--from", help="Engine checkpoint to continue from (ellama import-hf)."),
    data: Optional[Path] = typer.Option(None, "--data", help="manifest.json written by `ellama data build`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (checkpoints, metrics.jsonl, logs)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (overrides schedule.train_steps)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the resolved plan and the launch; run nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dryrun: print one JSON object instead of tables."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. schedule.lr_fraction=0.05"),
) -> None:
    from ellama_recipes.recipe import build_pretrain_config

    cfg = build_pretrain_config(
        size,
        num_nodes=nodes,
        gpus_per_node=gpus_per_node,
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        executor=executor,
        manifest=str(data) if data is not None else None,
        restore_from=str(from_ckpt) if from_ckpt is not None else None,
        out_dir=str(out) if out is not None else None,
        train_steps=steps,
        save_every=save_every,
        overrides=list(overrides or []),
    )
    if dryrun:
        cfg.validate()
        _dryrun(cfg, as_json=as_json)
        return
    if as_json:
        from ellama_recipes.errors import UserError

        raise UserError("--json only applies with --dryrun (e.g. `ellama pretrain --size 70b --dryrun --json`).")
    _launch(cfg)


def _check_inputs(cfg) -> None:
    from ellama_recipes.errors import UserError

    problems = []
    if cfg.data.manifest and not Path(cfg.data.manifest).is_file():
        problems.append(f"--data {cfg.data.manifest}: no such file. Build it with `ellama data build ... --out DIR`.")
    if cfg.checkpoint.restore_from and not Path(cfg.checkpoint.restore_from).exists():
        problems.append(
            f"--from {cfg.checkpoint.restore_from}: no such checkpoint. Create one with `ellama import-hf --size {cfg.size} --out DIR`."
        )
    if problems:
        raise UserError("Cannot start pretraining:", problems=problems)


def _launch(cfg) -> None:
    from ellama_recipes import launch
    from ellama_recipes.recipe import local_gpu_capability
    from ellama_recipes.recipes import get_recipe

    cfg.validate(at_launch=True, gpu_capability=local_gpu_capability())
    _check_inputs(cfg)
    partial = None if launch.in_process(cfg) else get_recipe("pretrain")(cfg)
    result = launch.launch(cfg, partial)
    console.print(Panel.fit("\n".join(f"{k}: {v}" for k, v in result.items()), title="pretrain finished"))


def _dryrun(cfg, *, as_json: bool) -> None:
    from ellama_recipes import launch
    from ellama_recipes.plan import compute_plan
    from ellama_recipes.recipes import get_recipe

    # NeMo prints banners and warnings while building: keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        partial = get_recipe("pretrain")(cfg)
        plan = launch.render(cfg, partial)
    summary = cfg.summary()
    memory = compute_plan(cfg)["memory_per_gpu_gib"]
    if as_json:
        print_json({**summary, "memory_per_gpu_gib": memory, "launch": plan.as_dict(), "config": cfg.to_dict()})
        return
    table = Table(title=f"ellama pretrain --size {cfg.size}: resolved plan", show_lines=False)
    table.add_column("key", style="cyan")
    table.add_column("value")
    for k, v in summary.items():
        table.add_row(k, _fmt(v))
    table.add_row("memory_per_gpu_gib", ", ".join(f"{k} {v}" for k, v in memory.items()))
    console.print(table)
    if plan.script:
        console.print(Panel(Syntax(plan.script, "bash", word_wrap=True), title="sbatch script (slurm executor)"))
    elif plan.command:
        console.print(Panel(plan.command, title="torchrun command (local executor)"))
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print("[dim]Dry run: nothing was launched.[/]")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)
