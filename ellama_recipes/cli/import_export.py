"""`ellama import-hf` / `ellama export-hf`: HF <-> engine checkpoints. No business logic: see ellama_recipes.workflows.import_export."""

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

--from names a local HF directory or a Hub repo id (downloaded with huggingface-hub, token from $HF_TOKEN,
resumable: re-run to continue); the architecture is read from its config.json, so any Llama-3.1-architecture shape
imports and --size is not needed (given, the source must match it). Without --from, --size picks the size's Hub
repo, or builds its base locally when the size row names none (tiny). Tensors stream one group at a time (memory
bounded by the largest tensor group, not the model), progress in bytes; then every HF tensor is read back and
compared bit for bit with the engine checkpoint (after undoing the QKV interleaving and gate/up fusion with
independent code); any unmapped or mismatched tensor is an error (exit 2) and nothing is written.

Example:  ellama import-hf --size 8b --out checkpoints/llama31-8b

Example:  ellama import-hf --from ./my-llama --out checkpoints/mine --workers 2
"""

EXPORT_HELP = """Engine checkpoint (imported or trained) -> Hugging Face directory, verified before it is written.

--from takes a checkpoint dir (weights/ + context/) or a run dir (the latest COMPLETE checkpoint under
RUN/checkpoints/ is used; partial ones are skipped with a message). Writes safetensors, config.json (llama3 RoPE
scaling, GQA, vocab = tokenizer size), generation_config.json and the tokenizer. Before the output appears it checks
that every engine tensor maps to exactly one HF tensor, bit-exact, and that transformers' logits on a fixed batch
match the engine's own forward pass (models up to 1 GiB by default; --check-logits forces it, it loads the whole
model). Tensors stream one group at a time, read from the checkpoint without building the model, progress in bytes.
A failed check exits 2 with the per-tensor report and writes nothing.

Example:  ellama export-hf --from runs/cpt --out hf/llama31-8b-ecom
"""


@app.command("import-hf", help=_reflow(IMPORT_HELP))
def import_hf(
    size: Optional[str] = typer.Option(
        None, "--size", help="tiny, 8b, 70b or 405b: without --from, picks the source; with it, checks the shape."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create (must not exist)."),
    source: Optional[str] = typer.Option(
        None, "--from", help="Local HF directory or Hub repo id (default: the size's Hub repo; tiny: built locally)."
    ),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print what would be downloaded and converted; write nothing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    workers: int = typer.Option(1, "--workers", min=1, help="Tensor groups converted in parallel (memory x N)."),
) -> None:
    from ellama_recipes.workflows import import_export

    if dryrun:
        print_json(import_export.describe_import(size, out, source))
        return
    path = import_export.import_hf(size, out, source=source, progress=progress, workers=workers)
    console.print(f"[green]imported[/] {source or size} -> {path} (every HF tensor verified bit-exact)")


@app.command("export-hf", help=_reflow(EXPORT_HELP))
def export_hf(
    source: Path = typer.Option(..., "--from", help="Engine checkpoint dir or run dir (latest complete checkpoint)."),
    out: Path = typer.Option(..., "--out", help="HF directory to create (must not exist)."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the tensor mapping table; write nothing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    workers: int = typer.Option(1, "--workers", min=1, help="Tensor groups converted in parallel (memory x N)."),
    check_logits: Optional[bool] = typer.Option(
        None, "--check-logits/--no-check-logits",
        help="Compare transformers' logits with the engine's (default: only for models up to 1 GiB)."),
) -> None:
    from rich.table import Table

    from ellama_recipes.workflows import import_export

    report = import_export.export_hf(source, out, dryrun=dryrun, progress=progress, workers=workers,
                               check_logits=check_logits, echo=lambda m: err_console.print(f"[yellow]{m}[/]"))
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
    logits = f"max |logit diff| {report['max_logit_diff']:.3g} (tolerance {report['logit_tolerance']:.1g})" \
        if report["logits_checked"] else "logits check skipped (model over 1 GiB; --check-logits to force)"
    console.print(f"[green]exported[/] {report['checkpoint']} -> {out}: {n} tensors bit-exact, {logits}")
