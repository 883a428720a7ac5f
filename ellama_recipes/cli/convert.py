"""`ellama import-hf` / `ellama export-hf`: HF <-> engine checkpoints (owned by the converter)."""

from ellama_recipes.cli.common import not_yet
from ellama_recipes.cli.main import app


@app.command("import-hf", help="Hugging Face Llama 3.1 (Hub or local dir) -> engine checkpoint.\n\nExample:  ellama import-hf --size 8b --out checkpoints/llama31-8b")
def import_hf() -> None:
    not_yet("import-hf", "in progress")


@app.command("export-hf", help="Engine checkpoint -> Hugging Face directory.\n\nExample:  ellama export-hf --from runs/cpt --out hf/")
def export_hf() -> None:
    not_yet("export-hf", "in progress")
