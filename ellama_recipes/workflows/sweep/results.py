"""The sweep's results read off its run folders: per-point status and losses against the base pass, the Pareto
front and the recommendation (``OUT/sweep.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ellama_recipes.io.metrics import read_metrics
from ellama_recipes.workflows.sweep.grid import SweepPoint, SweepSpec

def _val_records(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r.get("val_loss_domain") is not None and r.get("val_loss_general") is not None]


def point_status(run_dir: Path, train_steps: int) -> tuple[str, int]:
    """``("finished" | "partial" | "new", last logged step)``: finished = validated at the final step."""
    recs = read_metrics(run_dir)
    last = max((int(r["step"]) for r in recs), default=0)
    if any(int(r["step"]) >= train_steps for r in _val_records(recs)):
        return "finished", last
    return ("partial" if recs or (Path(run_dir) / "checkpoints").exists() else "new"), last


def base_values(base_dir: Path) -> dict[str, float] | None:
    """The ``--from`` checkpoint's ``val_loss_domain`` / ``val_loss_general`` (step-0 record), None if not measured."""
    for r in _val_records(read_metrics(base_dir)):
        if int(r["step"]) == 0:
            return {"val_loss_domain": float(r["val_loss_domain"]), "val_loss_general": float(r["val_loss_general"])}
    return None


def _loss_entry(final: float | None, best: float | None, base: float | None) -> dict[str, float | None]:
    change = final - base if final is not None and base is not None else None
    pct = 100.0 * change / base if change is not None and base else None
    return {"final": final, "best": best, "base": base, "change": change, "change_pct": pct}


def collect_point(point: SweepPoint, base: dict[str, float] | None) -> dict[str, Any]:
    """One ``sweep.json`` entry from the point's run folder."""
    cfg = point.cfg
    steps = cfg.schedule.train_steps
    recs = read_metrics(point.run_dir)
    status, last = point_status(point.run_dir, steps)
    val = _val_records(recs)
    final = val[-1] if val else {}
    entry: dict[str, Any] = {
        "name": point.name,
        "status": status,
        "knobs": {"lr_fraction": point.lr_fraction, "lr": cfg.schedule.lr, "ratio": point.ratio,
                  "general_to_domain": point.general_to_domain},
        "run_dir": str(point.run_dir),
        "manifest": str(point.manifest),
        "steps": last,
        "train_steps": steps,
    }
    for side in ("domain", "general"):
        key = f"val_loss_{side}"
        entry[key] = _loss_entry(final.get(key), min((r[key] for r in val), default=None),
                                 base.get(key) if base else None)
    dom, gen = entry["val_loss_domain"]["change_pct"], entry["val_loss_general"]["change_pct"]
    entry["domain_gain_pct"] = -dom if dom is not None else None
    entry["general_regression_pct"] = gen
    entry["tokens_seen"] = last * cfg.schedule.tokens_per_step
    entry["wall_time_s"], entry["wall_time_source"] = _wall_time(point.run_dir, recs)
    return entry


def _wall_time(run_dir: Path, recs: list[dict]) -> tuple[float | None, str]:
    state = Path(run_dir) / "sweep_point.json"
    if state.exists():
        try:
            d = json.loads(state.read_text())
            if d.get("wall_time_s") is not None:
                return round(float(d["wall_time_s"]), 3), "measured around each attempt"
        except (json.JSONDecodeError, ValueError):
            pass
    times = [r["step_time_s"] for r in recs if r.get("step_time_s") is not None]
    return (round(sum(times), 3), "sum of step times") if times else (None, "unknown")


# ------------------------------------------------------------------------------ Pareto front and recommendation
def pareto_front(entries: list[dict]) -> list[str]:
    """Names of the points no other point beats on both axes (smaller general increase AND larger domain
    decrease, one of them strictly), ordered by general increase."""
    pts = [(e["name"], e["general_regression_pct"], e["domain_gain_pct"]) for e in entries
           if e.get("general_regression_pct") is not None and e.get("domain_gain_pct") is not None]
    front = []
    for n, x, y in pts:
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for n2, x2, y2 in pts if n2 != n)
        if not dominated:
            front.append((x, -y, n))
    return [n for _, _, n in sorted(front)]


def recommend(entries: list[dict], max_regression_pct: float) -> tuple[str | None, str]:
    """The point with the largest domain gain whose general regression is within the budget (ties: the smaller
    regression, then the smaller LR); ``(None, why)`` when no finished point qualifies."""
    scored = [e for e in entries if e.get("domain_gain_pct") is not None and e.get("general_regression_pct") is not None]
    if not scored:
        return None, "no finished point with base and final validation losses to compare"
    ok = [e for e in scored if e["general_regression_pct"] <= max_regression_pct]
    if not ok:
        least = min(scored, key=lambda e: e["general_regression_pct"])
        return None, (f"no point keeps the general regression within {max_regression_pct:g}%; the smallest is "
                      f"{least['general_regression_pct']:.2f}% ({least['name']}). Raise --max-regression, lower the "
                      f"LR fraction or give the general side a larger share.")
    best = max(ok, key=lambda e: (e["domain_gain_pct"], -e["general_regression_pct"], -e["knobs"]["lr_fraction"]))
    return best["name"], (f"largest domain gain ({best['domain_gain_pct']:.2f}%) with general regression "
                          f"{best['general_regression_pct']:.2f}% <= {max_regression_pct:g}%")


def sweep_result(spec: SweepSpec, points: list[SweepPoint], base: dict[str, float] | None) -> dict[str, Any]:
    """The ``sweep.json`` object."""
    entries = [collect_point(p, base) for p in points]
    finished = [e for e in entries if e["status"] == "finished"]
    front = pareto_front(finished)
    rec, why = recommend(finished, spec.max_regression_pct)
    for e in entries:
        e["pareto"] = e["name"] in front
        e["within_budget"] = (e["general_regression_pct"] is not None
                              and e["general_regression_pct"] <= spec.max_regression_pct)
    return {
        "size": spec.size,
        "from": str(spec.restore_from) if spec.restore_from else None,
        "data": str(spec.source_manifest),
        "out": str(spec.out),
        "grid": {"lr_fraction": spec.lr_fractions, "ratio": spec.ratios},
        "train_steps": points[0].cfg.schedule.train_steps if points else None,
        "tokens_per_step": points[0].cfg.schedule.tokens_per_step if points else None,
        "executor": spec.executor,
        "max_regression_pct": spec.max_regression_pct,
        "base": {**(base or {"val_loss_domain": None, "val_loss_general": None}),
                 "measured": "validation-only pass of the --from checkpoint before any step (OUT/base/metrics.jsonl, step 0)"},
        "points": entries,
        "pareto_front": front,
        "recommended": rec,
        "recommendation": why,
        "unfinished": ([] if base else ["base"]) + [e["name"] for e in entries if e["status"] != "finished"],
        "chart": "sweep.png",
    }
