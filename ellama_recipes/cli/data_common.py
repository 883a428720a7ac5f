"""Helpers shared by the `ellama data ...` commands (cli/data.py): the record-schema and executor help texts,
``section.field=value`` overrides of the stage configs, the ``--executor`` / ``--ray-address`` check and the
report lines. No business logic; re-exported from :mod:`ellama_recipes.cli.data`.
"""

from __future__ import annotations

from dataclasses import fields

from ellama_recipes.cli.common import console
from ellama_recipes.errors import UserError

RECORD_SCHEMA = (
    "Domain JSONL records: product {type:'product', id, title, category, attributes:{k:v}, description, lang}, "
    "review {type:'review', product_id, rating, text, lang}, article {type:'article', product_ids:[...], text, lang}. "
    "General: {text, lang?} (lang detected when absent). Each PATH is a .jsonl/.parquet file or a folder of them."
)


def _apply_overrides(overrides: list[str] | None, targets: dict[str, object]) -> dict[str, object]:
    """Apply ``section.field=value`` pairs to dataclass ``targets`` (by section name); unknown keys are errors."""
    valid = [f"{sec}.{f.name}" for sec, obj in targets.items() for f in fields(obj)]
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"Override {item!r} is not key=value. Valid keys: {', '.join(valid)}.")
        key, raw = item.split("=", 1)
        sec, _, name = key.partition(".")
        obj = targets.get(sec)
        fmap = {f.name: f for f in fields(obj)} if obj is not None else {}
        if name not in fmap:
            raise UserError(f"Unknown override key {key!r}. Valid keys: {', '.join(valid)}.")
        cur = getattr(obj, name)
        try:
            if isinstance(cur, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                val: object = raw.lower() in ("true", "1")
            else:
                val = type(cur)(raw)
        except ValueError:
            raise UserError(f"Override {key}={raw!r}: expected a {type(cur).__name__}.") from None
        setattr(obj, name, val)
    return {sec: {f.name: getattr(obj, f.name) for f in fields(obj)} for sec, obj in targets.items()}


EXECUTOR_HELP = ("ray (default: the stages run as Ray Data pipelines; a local Ray instance on this machine, loopback "
                 "only, unless --ray-address / RAY_ADDRESS names a cluster), inprocess (the sequential pipeline in "
                 "this process) or slurm (build: submit a Ray cluster + the build through NeMo-Run with the "
                 "cluster.* keys of training; see --dryrun).")
RAY_ADDRESS_HELP = "Address of a running Ray cluster (e.g. 10.0.0.1:6379, or auto); default: start a local one."


def _executor(executor: str, ray_address: str | None, allowed=("ray", "inprocess")) -> str:
    if executor not in allowed:
        raise UserError(f"Unknown --executor {executor!r}. Use one of: {', '.join(allowed)}.")
    if ray_address and executor != "ray":
        raise UserError(f"--ray-address {ray_address} needs --executor ray (got {executor}).")
    return executor


def _print_table(report: dict) -> None:
    from ellama_recipes.data.pipeline import stage_table

    console.print(stage_table(report))


def _mining_line(rep: dict) -> str:
    b = rep["budget"]
    at = "" if rep["min_mined_score"] is None else f", lowest mined score {rep['min_mined_score']:.2f}"
    q = rep["score_quantiles_general"]
    return (f"mined {rep['mined']} of {rep['general_documents']} general documents ({b['by']} {b['value']}{at}; "
            f"general score median {q.get('q0.5')}, 99th percentile {q.get('q0.99')})")
