"""`ellama sweep`: e-Llama's small-scale search over the max-LR fraction x the general:domain mix ratio.

CLI::

    ellama sweep --size tiny --from base/ --data data/manifest.json --out sweep/ \\
        --lr-fraction 0.05,0.1,0.2 --ratio 4:1,1:1,1:4 --steps 40

Every grid point is one continued-pretraining run of the registered ``pretrain`` recipe with exactly two knobs
changed: ``schedule.lr_fraction`` and the blend (``data.manifest``, re-weighted from the already tokenized sources
by :func:`ellama_recipes.data.reblend.reblend`, never re-tokenized). All runs form one NeMo-Run ``Experiment``
(:mod:`ellama_recipes.engine.experiment`): on the local executor sequentially or ``--parallel K`` at a time,
on Slurm one job per point. A world-size-1 local point's task is :func:`train_point` (the base pass:
:func:`validate_point`) in a fresh process, which rebuilds the config and the recipe's partial from JSON there; every
other task is the recipe's partial built here. Output folder::

    OUT/data/                  only with --data-domain/--data-general: the data built once (`ellama data build`)
    OUT/blends/r<G>-<D>/       manifest.json (+ reblend.json) for each ratio
    OUT/base/metrics.jsonl     the --from checkpoint's per-source validation loss before any step (step 0)
    OUT/runs/<name>/           one run folder per point (checkpoints/, metrics.jsonl, logs/), name lr<F>_r<G>-<D>
    OUT/sweep.json             per point: knobs, final/best val_loss_domain and val_loss_general, their change from
                               the base values, tokens seen, wall time; the Pareto front and the recommendation
    OUT/sweep.png              general loss increase (x) vs domain loss decrease (y), Pareto front drawn

Re-running the same command skips finished points (a validation record at the final step in metrics.jsonl) and
resumes unfinished ones from their last complete checkpoint (the pretrain recipe's own resume).

The recommendation is the point with the largest domain gain (relative decrease of ``val_loss_domain`` from the
base) whose general regression (relative increase of ``val_loss_general``) stays within ``--max-regression``
(default 1 %).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError
from ellama_recipes.io.metrics import read_metrics

SWEPT_KEYS = ("schedule.lr_fraction", "data.manifest", "checkpoint.out_dir")
DEFAULT_MAX_REGRESSION_PCT = 1.0


# ---------------------------------------------------------------------------------------------------------- grid
def _split(values: list[str] | str) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    return [x.strip() for item in items for x in str(item).split(",") if x.strip()]


def parse_lr_fractions(values: list[str] | str) -> list[float]:
    """``"0.05,0.1,0.2"`` (or repeated flags) -> ``[0.05, 0.1, 0.2]``; each in (0, 1], no duplicates."""
    out: list[float] = []
    problems = []
    for raw in _split(values):
        try:
            v = float(raw)
        except ValueError:
            problems.append(f"{raw!r} is not a number")
            continue
        if not (0 < v <= 1) or not math.isfinite(v):
            problems.append(f"{raw} must be in (0, 1] (a fraction of the base model's max LR; e-Llama used 0.10)")
        elif v in out:
            problems.append(f"{raw} is listed twice")
        else:
            out.append(v)
    if not out and not problems:
        problems.append("no value given")
    if problems:
        raise UserError("--lr-fraction must be a comma-separated list of fractions, e.g. --lr-fraction 0.05,0.1,0.2:",
                        problems=problems)
    return out


def parse_ratios(values: list[str] | str) -> list[str]:
    """``"4:1,1:1,1:4"`` -> ``["4:1", "1:1", "1:4"]`` (general:domain by tokens); no two equal ratios."""
    from ellama_recipes.data.blend import parse_ratio

    out: list[str] = []
    seen: dict[float, str] = {}
    problems = []
    for raw in _split(values):
        try:
            v = parse_ratio(raw)
            if ":" not in raw:
                raise UserError("")
        except UserError:
            problems.append(f"{raw!r} is not GENERAL:DOMAIN with both parts > 0 (e.g. 4:1)")
            continue
        g, d = (float(x) for x in raw.split(":"))
        label = f"{g:g}:{d:g}"
        if round(v, 12) in seen:
            problems.append(f"{raw} is the same ratio as {seen[round(v, 12)]}")
            continue
        seen[round(v, 12)] = label
        out.append(label)
    if not out and not problems:
        problems.append("no value given")
    if problems:
        raise UserError("--ratio must be a comma-separated list of general:domain token ratios, e.g. --ratio "
                        "4:1,1:1,1:4:", problems=problems)
    return out


def ratio_slug(ratio: str) -> str:
    """``"4:1"`` -> ``"r4-1"`` (file-name safe)."""
    return "r" + ratio.replace(":", "-")


def point_name(lr_fraction: float, ratio: str) -> str:
    """``(0.05, "4:1")`` -> ``"lr0.05_r4-1"``: the run folder name under ``OUT/runs/``."""
    return f"lr{lr_fraction:g}_{ratio_slug(ratio)}"


def parse_max_regression(value: str | float | None) -> float:
    """``"1"``, ``"1%"`` or ``1.0`` -> 1.0 (percent of the base model's general validation loss)."""
    if value is None:
        return DEFAULT_MAX_REGRESSION_PCT
    raw = str(value).strip().rstrip("%").strip()
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not (v >= 0) or not math.isfinite(v):
        raise UserError(f"--max-regression {value!r} must be a percentage >= 0, e.g. 1 or 1% (the largest allowed "
                        "increase of the general validation loss over the base model's).")
    return v


@dataclass
class SweepPoint:
    name: str
    lr_fraction: float
    ratio: str
    manifest: Path
    run_dir: Path
    cfg: Any = None  # PretrainConfig

    @property
    def general_to_domain(self) -> float:
        from ellama_recipes.data.blend import parse_ratio

        return parse_ratio(self.ratio)


@dataclass
class SweepSpec:
    """Everything a sweep needs, resolved from the command line."""

    size: str
    restore_from: Path | None
    out: Path
    lr_fractions: list[float]
    ratios: list[str]
    data: Path | None = None  # --data MANIFEST
    data_domain: list[Path] = field(default_factory=list)
    data_general: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None
    steps: int | None = None
    executor: str = "local"
    parallel: int | None = None
    max_regression_pct: float = DEFAULT_MAX_REGRESSION_PCT
    overrides: list[str] = field(default_factory=list)

    @property
    def builds_data(self) -> bool:
        return self.data is None

    @property
    def source_manifest(self) -> Path:
        """The manifest every blend is re-weighted from (``--data``, or ``OUT/data/manifest.json`` once built)."""
        if self.data is not None:
            return self.data / "manifest.json" if self.data.is_dir() else self.data
        return self.out / "data" / "manifest.json"


def check_spec(spec: SweepSpec) -> None:
    """UserError listing every problem with the inputs (before anything is built or launched). Makes every path
    absolute: NeMo-Run runs the tasks from another working directory."""
    for name in ("out", "restore_from", "data", "tokenizer"):
        if getattr(spec, name) is not None:
            setattr(spec, name, Path(getattr(spec, name)).expanduser().absolute())
    spec.data_domain = [Path(p).expanduser().absolute() for p in spec.data_domain]
    spec.data_general = [Path(p).expanduser().absolute() for p in spec.data_general]
    problems = []
    if spec.data is not None and (spec.data_domain or spec.data_general or spec.tokenizer):
        problems.append("pass either --data MANIFEST or --data-domain/--data-general/--tokenizer, not both")
    if spec.data is None and not (spec.data_domain and spec.data_general and spec.tokenizer):
        problems.append("no data: pass --data MANIFEST (from `ellama data build`), or --data-domain PATH "
                        "--data-general PATH --tokenizer DIR to build it once")
    if spec.data is not None and not spec.source_manifest.is_file():
        problems.append(f"--data {spec.data}: no such manifest; build it with `ellama data build ... --out DIR`")
    if spec.steps is not None and spec.steps < 1:
        problems.append(f"--steps {spec.steps} must be >= 1")
    if spec.parallel is not None and spec.parallel < 1:
        problems.append(f"--parallel {spec.parallel} must be >= 1")
    if spec.executor not in ("local", "slurm"):
        problems.append(f"--executor {spec.executor!r} must be local or slurm")
    for ov in spec.overrides:
        key = ov.split("=", 1)[0].strip()
        if key in SWEPT_KEYS:
            problems.append(f"{key} is set by the sweep for every point (use --lr-fraction / --ratio / --out)")
    if problems:
        raise UserError("Cannot plan the sweep:", problems=problems)


def build_config(spec: SweepSpec, manifest: Path, out_dir: Path, lr_fraction: float | None = None):
    """The registered ``pretrain`` recipe's config (size table < recipe < flags < key=value), with the sweep's
    knobs applied last: ``data.manifest``, ``checkpoint.out_dir`` and (for a point) ``schedule.lr_fraction``."""
    from ellama_recipes.recipes import get_recipe

    knobs = [] if lr_fraction is None else [f"schedule.lr_fraction={lr_fraction!r}"]
    cfg = get_recipe("pretrain").build_config(
        spec.size,
        manifest=str(manifest),
        overrides=[*spec.overrides, *knobs],
        executor=spec.executor,
        restore_from=str(spec.restore_from) if spec.restore_from else None,
        out_dir=str(out_dir),
        train_steps=spec.steps,
    )
    if not any(o.split("=", 1)[0].strip() == "cluster.job_dir" for o in spec.overrides):
        # one NeMo-Run folder for the whole experiment (scripts, logs of every task), not one per run
        cfg.cluster.job_dir = str(Path(spec.out).absolute() / "nemo_run")
    return cfg


def recipe_config(spec: SweepSpec):
    """The recipe config every point starts from (before the sweep's two knobs)."""
    return build_config(spec, spec.source_manifest, spec.out / "runs")


def grid(spec: SweepSpec) -> list[SweepPoint]:
    """One :class:`SweepPoint` per (lr fraction, ratio), LR-major, each with its resolved config."""
    points = []
    for lr in spec.lr_fractions:
        for ratio in spec.ratios:
            name = point_name(lr, ratio)
            manifest = spec.out / "blends" / ratio_slug(ratio) / "manifest.json"
            run_dir = spec.out / "runs" / name
            cfg = build_config(spec, manifest, run_dir, lr)
            points.append(SweepPoint(name, lr, ratio, manifest, run_dir, cfg))
    return points


def base_point(spec: SweepSpec, points: list[SweepPoint]) -> SweepPoint:
    """The validation-only pass of ``--from`` (OUT/base): the first point's config, no step taken.

    Per-side validation sets do not depend on the general:domain ratio (inside a side, sources keep their token
    proportions and the non-English share), so one base pass serves every point.
    """
    first = points[0]
    cfg = build_config(spec, first.manifest, spec.out / "base", first.lr_fraction)
    return SweepPoint("base", first.lr_fraction, first.ratio, first.manifest, spec.out / "base", cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(base_cfg, cfg) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (recipe value, this point's value)}`` for every field that differs, plus the derived LR."""
    a, b = flatten(base_cfg.to_dict()), flatten(cfg.to_dict())
    diff = {k: (a.get(k), b[k]) for k in b if a.get(k) != b[k] or k == "schedule.lr_fraction"}
    if base_cfg.schedule.lr != cfg.schedule.lr:
        diff["schedule.lr (derived)"] = (base_cfg.schedule.lr, cfg.schedule.lr)
    return diff


# ------------------------------------------------------------------------------------------------- run folders
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


def summarize(spec: SweepSpec, points: list[SweepPoint], base: dict[str, float] | None) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------------- chart
POINT_COLOR = "#1f5fbf"
FRONT_COLOR = "#d9822b"
RECOMMENDED_COLOR = "#2ca02c"


def write_chart(result: dict, path: Path) -> int:
    """``sweep.png``: general loss increase (x, %) vs domain loss decrease (y, %), one labelled marker per
    finished run, the Pareto front as a line, the ``--max-regression`` budget as a dashed vertical line and the
    recommended point ringed. Returns the number of markers drawn. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [e for e in result["points"] if e["status"] == "finished"
           and e.get("general_regression_pct") is not None and e.get("domain_gain_pct") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    try:
        budget = result["max_regression_pct"]
        ax.axvline(budget, color="#888888", linestyle="--", linewidth=1, zorder=1,
                   label=f"--max-regression {budget:g}%")
        ax.axvline(0, color="#cccccc", linewidth=0.8, zorder=0)
        ax.axhline(0, color="#cccccc", linewidth=0.8, zorder=0)
        by_name = {e["name"]: e for e in pts}
        front = [by_name[n] for n in result["pareto_front"] if n in by_name]
        if front:
            ax.plot([e["general_regression_pct"] for e in front], [e["domain_gain_pct"] for e in front],
                    color=FRONT_COLOR, linewidth=1.5, zorder=2, label="Pareto front")
        rec = by_name.get(result.get("recommended") or "")
        if rec is not None:
            ax.scatter([rec["general_regression_pct"]], [rec["domain_gain_pct"]], s=420, facecolors="none",
                       edgecolors=RECOMMENDED_COLOR, linewidths=2.5, zorder=3, label=f"recommended: {rec['name']}")
        xs = [e["general_regression_pct"] for e in pts]
        ys = [e["domain_gain_pct"] for e in pts]
        ax.scatter(xs, ys, s=60, color=POINT_COLOR, zorder=4, label="runs")
        for e in pts:
            k = e["knobs"]
            ax.annotate(f"lr {k['lr_fraction']:g}, {k['ratio']}", (e["general_regression_pct"], e["domain_gain_pct"]),
                        textcoords="offset points", xytext=(8, 6), fontsize=8, zorder=5)
        if pts:  # room for the labels
            xmin, xmax = min(xs + [0, budget]), max(xs + [0, budget])
            ymin, ymax = min(ys + [0]), max(ys + [0])
            dx, dy = (xmax - xmin) or 1.0, (ymax - ymin) or 1.0
            ax.set_xlim(xmin - 0.12 * dx, xmax + 0.3 * dx)
            ax.set_ylim(ymin - 0.12 * dy, ymax + 0.18 * dy)
        ax.set_xlabel("general validation loss increase vs base (%)   [less forgetting <-]")
        ax.set_ylabel("domain validation loss decrease vs base (%)   [more gain ->]")
        ax.set_title(f"ellama sweep ({result['size']}): LR fraction x general:domain ratio, {len(pts)} runs")
        ax.grid(True, alpha=0.25)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, format="png", metadata={"Title": "ellama sweep", "Description": f"{len(pts)} runs"})
        tmp.replace(path)
    finally:
        plt.close(fig)
    return len(pts)


# -------------------------------------------------------------------------------------------------- the sweep
def prepare_blends(spec: SweepSpec, points: list[SweepPoint], echo: Callable[[str], None] = print) -> None:
    """Build the data once (build mode, unless OUT/data exists) and write each ratio's re-blended manifest
    (unless it exists: a resumed point keeps its blend)."""
    from ellama_recipes.data.reblend import reblend

    if spec.builds_data and not spec.source_manifest.is_file():
        from ellama_recipes.data.pipeline import build

        echo(f"building the data once into {spec.out / 'data'} (ellama data build)")
        build(domain=list(spec.data_domain), general=list(spec.data_general), tokenizer=spec.tokenizer,
              out=spec.out / "data", ratio=spec.ratios[0], progress=True)
    done = set()
    for p in points:
        if p.ratio in done:
            continue
        done.add(p.ratio)
        if p.manifest.is_file():
            continue
        m = reblend(spec.source_manifest, p.ratio, p.manifest.parent)
        echo(f"blend {p.ratio} (general:domain) -> {p.manifest} (realized "
             f"{m['realized']['general_to_domain_token_ratio']})")


def dryrun_plan(spec: SweepSpec) -> dict[str, Any]:
    """What the sweep would do: grid, per-point config differences, tokens and GPU-hours (nothing written)."""
    from ellama_recipes.workflows.plan import compute_plan

    check_spec(spec)
    base = recipe_config(spec)
    base.validate()
    points = grid(spec)
    rows = []
    total_tokens = 0
    total_gpu_hours = 0.0
    for p in points:
        p.cfg.validate()
        plan = compute_plan(p.cfg)
        status, last = point_status(p.run_dir, p.cfg.schedule.train_steps)
        total_tokens += plan["tokens"]
        total_gpu_hours += plan["gpu_hours"]
        rows.append({
            "name": p.name, "lr_fraction": p.lr_fraction, "lr": p.cfg.schedule.lr, "ratio": p.ratio,
            "status": status, "last_step": last, "tokens": plan["tokens"], "steps": plan["steps"],
            "gpu_hours": plan["gpu_hours"], "gpus": plan["gpus"],
            "differences": {k: [a, b] for k, (a, b) in config_differences(base, p.cfg).items()},
        })
    launch = _dryrun_launch(spec, points)
    return {
        "size": spec.size,
        "launch": launch,
        "points": rows,
        "runs": len(rows),
        "total_tokens": total_tokens,
        "total_gpu_hours": total_gpu_hours,
        "tflops_per_gpu": compute_plan(points[0].cfg)["tflops_per_gpu"],
        "data": ("build once into " + str(spec.out / "data") + " then re-blend") if spec.builds_data
        else f"re-blend {spec.source_manifest}",
        "base_pass": "one validation-only pass of --from (OUT/base) before the runs",
        "executor": spec.executor,
        "parallel": spec.parallel or (len(rows) if spec.executor == "slurm" else 1),
    }


def _dryrun_launch(spec: SweepSpec, points: list[SweepPoint]) -> dict[str, str]:
    """For launched points (Slurm, or more than one local rank): the sbatch script / torchrun command of each task,
    from a NeMo-Run dry run of the sweep's experiment in a scratch folder. Empty for in-process points."""
    import tempfile

    from ellama_recipes.workflows import launch

    if all(launch.in_process(p.cfg) for p in points):
        return {}
    from ellama_recipes.engine.experiment import run_experiment

    base = base_point(spec, points)
    jobs = [sweep_job("base", base.cfg, "validate")] + [sweep_job(p.name, p.cfg, "train") for p in points]
    with tempfile.TemporaryDirectory(prefix="ellama-sweep-dryrun-") as tmp:
        out = run_experiment(jobs, parallel=spec.parallel or len(jobs), base_dir=tmp, dryrun=True)
        return {name: text.replace(tmp, str(spec.out / "nemo_run")) for name, text in out["launch"].items()}


def run_sweep(spec: SweepSpec, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep and write ``sweep.json`` / ``sweep.png``; returns the ``sweep.json`` object
    (``result["launched"]`` says what was started this time)."""
    from ellama_recipes.config.rules import local_gpu_capability

    check_spec(spec)
    if spec.restore_from is None or not ((spec.restore_from / "weights").is_dir()
                                         and (spec.restore_from / "context").is_dir()):
        raise UserError(f"--from {spec.restore_from}: not an engine checkpoint (expected weights/ and context/ "
                        f"inside). Fix: create one with `ellama import-hf --size {spec.size} --out DIR`.")
    from ellama_recipes.workflows import launch
    from ellama_recipes.io.atomic import write_json

    points = grid(spec)
    cap = local_gpu_capability()
    problems = []
    for p in points:
        problems += [f"{p.name}: {x}" for x in p.cfg.problems(at_launch=True, gpu_capability=cap)]
        problems += [f"{p.name}: {x}" for x in launch.launch_problems(p.cfg)]
    if problems:
        raise UserError("Cannot start the sweep:", problems=problems)
    spec.out.mkdir(parents=True, exist_ok=True)
    prepare_blends(spec, points, echo)
    base = base_point(spec, points)
    pending = submitted_jobs(spec.out) if spec.executor == "slurm" else {}
    jobs = []
    if base_values(base.run_dir) is None:
        jobs.append(("base", base.cfg, "validate"))
    for p in points:
        status, last = point_status(p.run_dir, p.cfg.schedule.train_steps)
        if status == "finished":
            echo(f"{p.name}: finished (step {last}), skipped")
            continue
        echo(f"{p.name}: {'resuming after step ' + str(last) if status == 'partial' else 'starting'}")
        jobs.append((p.name, p.cfg, "train"))
    waiting = [name for name, _, _ in jobs if name in pending]
    if waiting:
        echo(f"{', '.join(waiting)}: submitted before (NeMo-Run experiment {pending[waiting[0]]}) and not finished: "
             f"not submitted again. If those Slurm jobs ended without finishing, delete {spec.out / SUBMITTED} and "
             "re-run to resubmit them (they resume from their last checkpoint).")
        jobs = [j for j in jobs if j[0] not in pending]
    launched: dict[str, Any] = {"jobs": [name for name, _, _ in jobs], "waiting": waiting}
    if jobs:
        from ellama_recipes.engine.experiment import run_experiment

        sweep_jobs = [sweep_job(name, cfg, kind) for name, cfg, kind in jobs]
        parallel = spec.parallel or (len(jobs) if spec.executor == "slurm" else 1)
        t0 = time.monotonic()
        launched.update(run_experiment(sweep_jobs, parallel=parallel, base_dir=spec.out / "nemo_run",
                                       detach=spec.executor == "slurm"))
        launched["elapsed_s"] = round(time.monotonic() - t0, 1)
        if spec.executor == "slurm":
            pending.update({name: launched["experiment"] for name, _, _ in jobs})
            write_json(spec.out / SUBMITTED, {"jobs": pending})
    result = summarize(spec, points, base_values(base.run_dir))
    result["launched"] = launched
    write_json(spec.out / "sweep.json", result)
    write_chart(result, spec.out / "sweep.png")
    return result


SUBMITTED = "slurm_jobs.json"


def submitted_jobs(out: Path) -> dict[str, str]:
    """``{task: NeMo-Run experiment id}`` of Slurm jobs an earlier run of this sweep submitted (``OUT/slurm_jobs.json``)."""
    path = Path(out) / SUBMITTED
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text())["jobs"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path} is unreadable. Fix: delete it (the sweep then resubmits every unfinished point).") from None


def _executor(cfg) -> Any:
    """None: a world-size-1 local point runs in-process inside its NeMo-Run task (the tiny CPU path); else the
    launcher's executor for the recipe (torchrun on this node, or one Slurm job)."""
    from ellama_recipes.workflows import launch

    if launch.in_process(cfg):
        return None
    return launch.make_executor(cfg)


def sweep_job(name: str, cfg, kind: str) -> Any:
    """The engine's :class:`~ellama_recipes.engine.experiment.SweepJob` for one task (``kind`` "train" or
    "validate"): an in-process point gets its entry function (:func:`train_point` / :func:`validate_point`, run by
    NeMo-Run in a fresh process), a launched one the recipe's partial for ``cfg``."""
    from ellama_recipes.engine.experiment import SweepJob

    executor = _executor(cfg)
    if executor is None:
        return SweepJob(name, cfg, kind, entry=train_point if kind == "train" else validate_point)
    from ellama_recipes.recipes import get_recipe

    return SweepJob(name, cfg, kind, executor, partial=get_recipe(cfg.stage).build_partial(cfg))


def load_point_config(config: str):
    """A task's config from its JSON (``cfg.to_dict()``), through the registered recipe of its stage."""
    from ellama_recipes.recipes import get_recipe

    d = json.loads(config)
    return get_recipe(d.get("stage", "pretrain")).config_cls.from_dict(d)


def _record_attempt(out: Path, **values: Any) -> dict:
    path = out / "sweep_point.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    state.update(values)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, path)
    return state


def train_point(config: str) -> None:
    """NeMo-Run task of one world-size-1 point: train it in this (fresh) process
    (:func:`ellama_recipes.workflows.launch.run_in_process`: validate, check inputs, build the partial, run it).

    ``RUN/sweep_point.json`` records this process's id while it runs (``pid``) and the wall time summed over the
    attempts that ended (``wall_time_s``; an attempt killed with SIGKILL cannot add its own).
    """
    from ellama_recipes.workflows.launch import run_in_process

    cfg = load_point_config(config)
    out = Path(cfg.checkpoint.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev = _record_attempt(out, pid=os.getpid(), started=time.time()).get("wall_time_s") or 0.0
    t0 = time.monotonic()
    try:
        run_in_process(cfg)
    finally:
        _record_attempt(out, pid=None, wall_time_s=round(prev + time.monotonic() - t0, 3))


def validate_point(config: str) -> None:
    """NeMo-Run task of the world-size-1 base pass: ``llm.validate`` of ``--from`` in this process
    (:func:`ellama_recipes.engine.experiment.run_validation` of the recipe's partial)."""
    from ellama_recipes.engine.experiment import run_validation
    from ellama_recipes.recipes import get_recipe

    cfg = load_point_config(config)
    run_validation(cfg, get_recipe(cfg.stage).build_partial(cfg))


def from_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


__all__ = [
    "SweepPoint", "SweepSpec", "parse_lr_fractions", "parse_ratios", "parse_max_regression", "point_name",
    "grid", "config_differences", "pareto_front", "recommend", "summarize", "write_chart", "dryrun_plan",
    "run_sweep", "point_status", "base_values", "sweep_job", "train_point", "validate_point",
]
