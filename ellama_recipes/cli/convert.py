"""`ellama import-hf` / `ellama export-hf`: HF <-> engine checkpoints. No business logic: see ellama_recipes.convert."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ellama_recipes.cli.common import console, err_console, print_json
from ellama_recipes.cli.app import app


def _reflow(text: str) -> str:
    """Join hard-wrapped lines so the terminal, not the source, decides where help text wraps."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))

IMPORT_HELP = """Hugging Face Llama 3.1 (Hub or local dir) -> engine (NeMo 2) checkpoint, verified tensor by tensor.

Downloads with huggingface-hub (token from $HF_TOKEN, resumable: re-run to continue) unless --from names a local
directory. `--size tiny` without --from builds the tiny Llama-3.1-architecture base locally (no Hub); with --from it
accepts any Llama-3.1-architecture shape. After conversion every HF tensor is compared bit for bit with the engine
checkpoint (after undoing NeMo's QKV interleaving and gate/up fusion); any unmapped or mismatched tensor is an
error (exit 2) and nothing is written.

Example:  ellama import-hf --size 8b --out checkpoints/llama31-8b
"""

EXPORT_HELP = """Engine checkpoint (imported or trained) -> Hugging Face directory, verified before it is written.

--from takes a checkpoint dir (weights/ + context/) or a run dir (the latest COMPLETE checkpoint under
RUN/checkpoints/ is used; partial ones are skipped with a message). Writes safetensors, config.json (llama3 RoPE
scaling, GQA, vocab = tokenizer size), generation_config.json and the tokenizer. Before the output appears it checks
that every engine tensor maps to exactly one HF tensor, bit-exact, and that transformers' logits on a fixed batch
match the engine's own forward pass. A failed check exits 2 with the per-tensor report and writes nothing.

Example:  ellama export-hf --from runs/cpt --out hf/llama31-8b-ecom
"""


@app.command("import-hf", help=_reflow(IMPORT_HELP))
def import_hf(
    size: str = typer.Option(..., "--size", help="tiny, 8b, 70b or 405b (picks the Hub repo and checks the shape)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create (must not exist)."),
    source: Optional[str] = typer.Option(
        None, "--from", help="Local HF directory or Hub repo id (default: the size's Hub repo; tiny: built locally)."
    ),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print what would be downloaded and converted; write nothing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    from ellama_recipes import convert

    if dryrun:
        print_json(convert.describe_import(size, out, source))
        return
    path = convert.import_hf(size, out, source=source, progress=progress)
    console.print(f"[green]imported[/] {size} -> {path} (every HF tensor verified bit-exact)")


@app.command("export-hf", help=_reflow(EXPORT_HELP))
def export_hf(
    source: Path = typer.Option(..., "--from", help="Engine checkpoint dir or run dir (latest complete checkpoint)."),
    out: Path = typer.Option(..., "--out", help="HF directory to create (must not exist)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the tensor mapping table; write nothing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    from rich.table import Table

    from ellama_recipes import convert

    report = convert.export_hf(source, out, dryrun=dryrun, progress=progress,
                               echo=lambda m: err_console.print(f"[yellow]{m}[/]"))
    if dryrun:
        table = Table(title=f"{report['checkpoint']} -> Hugging Face tensor mapping")
        for col in ("engine name", "HF name", "shape", "dtype"):
            table.add_column(col, overflow="fold")
        for row in report["mapping"]:
            table.add_row(row["engine"], row["hf"], "x".join(map(str, row["shape"])), row["dtype"])
        console.print(table)
        console.print(f"{len(report['mapping'])} HF tensors; dry run, nothing written.")
        return
    n = len(report["tensors"])
    console.print(
        f"[green]exported[/] {report['checkpoint']} -> {out}: {n} tensors bit-exact, max |logit diff| "
        f"{report['max_logit_diff']:.3g} (tolerance {report['logit_tolerance']:.1g})"
    )
