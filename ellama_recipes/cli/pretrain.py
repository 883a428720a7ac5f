"""`ellama pretrain`: continued pretraining of Llama 3.1 (e-Llama recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

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

  ellama pretrain --size tiny --gpus-per-node 2 parallel.tensor_parallel=2 --from checkpoints/tiny --data
  data/manifest.json --out runs/tp2    (no GPU: 2 CPU processes over gloo, launched by torchrun)
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
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Start from random weights on purpose (no --from)."),
    data: Optional[Path] = typer.Option(None, "--data", help="manifest.json written by `ellama data build`."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (checkpoints, metrics.jsonl, logs)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (overrides schedule.train_steps)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the resolved plan and the launch; run nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dryrun: print one JSON object instead of tables."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. schedule.lr_fraction=0.05"),
) -> None:
    from ellama_recipes.cli.stage import execute
    from ellama_recipes.recipes import get_recipe

    cfg = get_recipe("pretrain").build_config(
        size,
        num_nodes=nodes,
        gpus_per_node=gpus_per_node,
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        executor=executor,
        manifest=str(data) if data is not None else None,
        restore_from=str(from_ckpt) if from_ckpt is not None else None,
        from_scratch=from_scratch,
        out_dir=str(out) if out is not None else None,
        train_steps=steps,
        save_every=save_every,
        overrides=list(overrides or []),
    )
    execute(cfg, dryrun=dryrun, as_json=as_json)
