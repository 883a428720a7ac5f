"""`ellama merge`: (1 - alpha) * base + alpha * adapted, streamed tensor by tensor; alpha sweep with eval."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ellama_recipes.cli.app import app
from ellama_recipes.cli.common import console, print_json

HELP = """Linear interpolation of a base and an adapted HF checkpoint: (1 - alpha) * base + alpha * adapted.

e-Llama merges the adapted model back toward its base to choose the trade-off between domain gain and general
regression. Streams tensor by tensor (safetensors), so peak memory is about one tensor pair, not two models. The
two checkpoints must share architecture, tokenizer and every tensor's name, shape and dtype (a mismatch exits 2
naming the tensor). alpha 0 and 1 reproduce the inputs bit-exactly. Config, generation config and tokenizer come
from --adapted. Outputs are atomic. One --alpha: --out is the merged model. Several: --out/alpha_<a>/ each; with
--eval each merge is evaluated against the base (`ellama eval` definitions; --data / --tasks as there) and
--out/tradeoff.png (domain gain vs general regression, alphas labelled) and --out/tradeoff.json hold the points.

(mergekit 0.1.5 needs transformers 5 and cannot share an environment with NeMo 2.7.3, hence this merge.)

Example:  ellama merge --base .quickstart/base_hf --adapted .quickstart/hf --alpha 0.5 --out merged

Example:  ellama merge --base B --adapted A --alpha 0.25 --alpha 0.5 --alpha 0.75 --out sweep --eval --data D/manifest.json
"""


def _reflow(text: str) -> str:
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


@app.command("merge", help=_reflow(HELP))
def merge(
    base: Path = typer.Option(..., "--base", help="HF directory of the base model (alpha 0)."),
    adapted: Path = typer.Option(..., "--adapted", help="HF directory of the adapted model (alpha 1)."),
    alpha: list[float] = typer.Option(..., "--alpha", help="Weight of the adapted model, 0..1; repeat for a sweep."),
    out: Path = typer.Option(..., "--out", help="Merged model directory (one alpha) or sweep folder (several)."),
    evaluate: bool = typer.Option(False, "--eval", help="Evaluate every merge and plot the trade-off (several alphas)."),
    data: list[str] = typer.Option([], "--data", help="With --eval: manifest.json or domain=/general= JSONL (see ellama eval)."),
    tasks: list[str] = typer.Option([], "--tasks", help="With --eval: tasks as in ellama eval (default: bundled)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --eval: at most N examples per task."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Check compatibility and print the plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    from ellama_recipes.workflows import merge as mg

    if dryrun:
        table = mg.check_compatible(base, adapted)
        plan = {"base": str(base), "adapted": str(adapted), "tensors": len(table),
                "outputs": [str(out)] if len(alpha) == 1 else [str(mg.alpha_dir(out, a)) for a in alpha],
                "eval": evaluate}
        print_json(plan) if as_json else console.print(plan)
        return
    echo = (lambda msg: None) if as_json else (lambda msg: console.print(msg, highlight=False))
    result = mg.merge(base, adapted, alpha, out, evaluate=evaluate, data=data, tasks=tasks, limit=limit, echo=echo)
    if as_json:
        print_json({k: v for k, v in result.items() if k != "eval"})
        return
    for m in result["merges"]:
        console.print(f"[green]merged[/] alpha={m['alpha']:g} -> {m['dir']}")
    for p in result.get("points", []):
        gain, reg = p["domain_gain_pct"], p["general_regression_pct"]
        console.print(f"alpha={p['alpha']:g}: domain gain {'-' if gain is None else f'{gain:+.2f}'} %, "
                      f"general regression {'-' if reg is None else f'{reg:+.2f}'} %")
    if "tradeoff_png" in result:
        console.print(f"[green]wrote[/] {result['tradeoff_png']} and {result['tradeoff_json']}")
