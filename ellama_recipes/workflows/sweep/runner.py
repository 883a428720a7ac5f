"""Running the sweep: blends, the dry run, the NeMo-Run experiment of every point, Slurm bookkeeping, and the
entry functions NeMo-Run runs for in-process points (:func:`train_point`, :func:`validate_point`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError
from ellama_recipes.io.atomic import write_json
from ellama_recipes.io.charts import sweep_front
from ellama_recipes.workflows.sweep.grid import SweepPoint, SweepSpec, base_point, check_spec, config_differences, grid, recipe_config
from ellama_recipes.workflows.sweep.results import base_values, point_status, sweep_result

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
    result = sweep_result(spec, points, base_values(base.run_dir))
    result["launched"] = launched
    write_json(spec.out / "sweep.json", result)
    sweep_front(result, spec.out / "sweep.png")
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
    write_json(path, state, indent=None)
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
