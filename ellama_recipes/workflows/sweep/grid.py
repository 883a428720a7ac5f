"""The sweep's grid: the command line's knobs parsed and checked, one pretraining config per point.

Every point is the registered ``pretrain`` recipe's config with exactly two knobs changed: ``schedule.lr_fraction``
and the blend (``data.manifest``, re-weighted per ratio), plus its own run folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellama_recipes.errors import UserError

SWEPT_KEYS = ("schedule.lr_fraction", "data.manifest", "checkpoint.out_dir")
DEFAULT_MAX_REGRESSION_PCT = 1.0


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
