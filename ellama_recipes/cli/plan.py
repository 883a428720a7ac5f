"""`ellama plan`: tokens, steps, memory per GPU, GPU-hours and wall-clock."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from ellama_recipes.cli.common import console, print_json
from ellama_recipes.cli.app import app

HELP = """Tokens, steps, per-GPU memory, GPU-hours and wall-clock for a size, GPU count and token budget.

GPU-hours use 6 x parameters x tokens FLOPs at --tflops achieved TFLOP/s per GPU. Default by precision: bf16 343
(e-Llama's 70B run implies it), fp8 647 (Megatron-Bridge 25.11's 744 for Llama3 8B FP8 on H100, less the attention
FLOPs it counts); the output names the source. benchmarks/gpu/proof.py measures ours on an H100.
Parallelism comes from the size's defaults; change it with key=value overrides (parallel.tensor_parallel=8 ...).

Examples:

  ellama plan --size 70b --gpus 480 --tokens 1T --tflops 343

  ellama plan --size 8b --gpus 64 --tokens 200B --fp8 --json
"""


@app.command("plan", help=HELP)
def plan(
    size: str = typer.Option(..., "--size", "-s", help="Model size: tiny, 8b, 70b or 405b."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Total GPUs (default: the size's default node count x 8)."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node."),
    tokens: str = typer.Option("1T", "--tokens", help="Token budget, e.g. 1T, 500B, 2.5e11."),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="Achieved model TFLOP/s per GPU (6N convention)."),
    fp8: bool = typer.Option(False, "--fp8", help="Plan for FP8 (changes the default --tflops)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. parallel.context_parallel=1"),
) -> None:
    from ellama_recipes.errors import UserError
    from ellama_recipes.workflows.plan import compute_plan, parse_tokens
    from ellama_recipes.recipes.pretrain import build_config

    n_tokens = parse_tokens(tokens)
    num_nodes = None
    if gpus is not None:
        if gpus < 1 or gpus_per_node < 1:
            raise UserError(f"--gpus {gpus} / --gpus-per-node {gpus_per_node} must be positive.")
        if gpus % gpus_per_node:
            raise UserError(
                f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}. "
                f"Use whole nodes, e.g. --gpus {max(gpus // gpus_per_node, 1) * gpus_per_node}."
            )
        num_nodes = gpus // gpus_per_node
    cfg = build_config(
        size, num_nodes=num_nodes, gpus_per_node=gpus_per_node if gpus is not None else None, fp8=fp8,
        overrides=list(overrides or []),
    )
    cfg.validate()
    result = compute_plan(cfg, tokens=n_tokens, tflops=tflops)
    if as_json:
        print_json(result)
        return
    table = Table(title=f"ellama plan --size {cfg.size}")
    table.add_column("", style="cyan")
    table.add_column("value", justify="right")
    rows = [
        ("parameters", f"{result['parameters'] / 1e9:,.2f} B"),
        ("GPUs", f"{result['gpus']:,} ({result['num_nodes']} nodes x {result['gpus_per_node']})"),
        ("parallelism", "TP{tensor_parallel} PP{pipeline_parallel} VPP{virtual_pipeline_parallel} "
         "CP{context_parallel} DP{data_parallel} SP={sequence_parallel}".format(**result)),
        ("precision", result["precision"]),
        ("tokens", f"{result['tokens']:,}"),
        ("tokens / step", f"{result['tokens_per_step']:,} ({result['global_batch_size']} x {result['seq_length']})"),
        ("steps", f"{result['steps']:,}"),
        ("TFLOP/s per GPU", f"{result['tflops_per_gpu']:,.0f} ({result['tflops_source']})"),
        ("GPU-hours", f"{result['gpu_hours']:,.0f}"),
        ("wall-clock", f"{result['wall_clock_hours']:,.1f} h ({result['wall_clock_days']:,.1f} days)"),
    ]
    for k, v in result["memory_per_gpu_gib"].items():
        rows.append((f"memory/GPU: {k}", f"{v:,.2f} GiB"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if not result["fits_h100_80gb"]:
        console.print(
            "[bold yellow]warning:[/] the estimate exceeds 80 GiB per GPU: raise parallel.tensor_parallel, "
            "pipeline_parallel or context_parallel, or enable activation recomputation."
        )
