"""The NeMo-Run ``Experiment`` of an `ellama sweep`: one task per grid point, plus the base-model validation pass.

Built by :func:`ellama_recipes.workflows.sweep.run_sweep`, which gives every :class:`SweepJob` what its task runs (the engine
runs what it is given and never looks a recipe up):

- a point whose world size is 1 on the local executor (the tiny CPU path) is a ``run.Partial`` of the job's
  ``entry`` (a module-level function of the layer above, :func:`ellama_recipes.workflows.sweep.runner.train_point` /
  :func:`ellama_recipes.workflows.sweep.runner.validate_point`) called with the point's config as JSON: NeMo-Run starts it as its
  own process, which rebuilds the config and the recipe's partial there and trains through
  :func:`ellama_recipes.engine.runner.run_local` (so no NeMo state is shared between points);
- any other point is the recipe's own partial (``job.partial``, built by the caller) on the launcher's executor
  (torchrun on this node, or one Slurm job per point: :func:`ellama_recipes.workflows.launch.make_executor`).

The base pass (``OUT/base``) runs the recipe's partial with ``llm.validate`` instead of ``llm.pretrain``
(:func:`validate_partial`): same model (restored from ``--from``), same data module (per-source validation), same
trainer and callbacks, no optimizer step; :class:`ellama_recipes.engine.callbacks.MetricsJsonl` writes its
``val_loss_domain`` / ``val_loss_general`` as the step-0 record of ``OUT/base/metrics.jsonl``.

Scheduling: with ``parallel`` K, task i depends on task i-K, so the local executor runs them in waves of K (NeMo-Run
waits for each wave) and Slurm gets ``afterok`` dependencies; K >= the number of tasks submits everything at once.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nemo_run as run

from ellama_recipes.engine.process_env import nemo_run_home


@dataclass
class SweepJob:
    name: str  # the task name: the point's folder name under OUT/runs, or "base"
    cfg: Any  # the point's PretrainConfig
    kind: str  # "train" or "validate"
    executor: Any = None  # None: in-process task (world size 1, local)
    partial: Any = None  # launched jobs (executor set): the recipe's training partial for cfg, built by the caller
    entry: Callable[[str], Any] | None = None  # in-process jobs: module-level function NeMo-Run runs as
    # entry(config=<cfg as JSON>) in a fresh process


def _config_json(cfg: Any) -> str:
    return json.dumps(cfg.to_dict())


def validate(model, data, trainer, log, optim, resume, run_dir: str | None = None, report: dict | None = None):
    """Entry function of the base pass in every rank: ``prepare_rank`` then ``llm.validate`` (no step taken, so no
    ``RUN/complete.json``: ``report``, the training partial's summary spec, is not used)."""
    from nemo.collections import llm

    from ellama_recipes.engine.runner import prepare_rank

    prepare_rank(run_dir)
    return llm.validate(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume)


def validate_partial(cfg: Any, partial: Any) -> Any:
    """``partial`` (the recipe's training partial for ``cfg``) with :func:`validate` as its function, everything else
    unchanged (``partial`` is changed in place and returned)."""
    import fiddle as fdl

    fdl.update_callable(partial, validate)
    if "run_dir" not in partial.__arguments__:
        partial.run_dir = str(Path(cfg.checkpoint.out_dir).absolute())
    return partial


def run_validation(cfg: Any, partial: Any) -> None:
    """The world-size-1 base pass in this process: ``llm.validate`` through :func:`validate_partial` of ``partial``."""
    import fiddle as fdl

    Path(cfg.checkpoint.out_dir).mkdir(parents=True, exist_ok=True)
    fdl.build(validate_partial(cfg, partial))()


def task(job: SweepJob) -> Any:
    """The ``run.Partial`` NeMo-Run runs for ``job``."""
    if job.executor is None:
        if job.entry is None:
            raise ValueError(f"sweep job {job.name}: an in-process job needs its entry function")
        return run.Partial(job.entry, config=_config_json(job.cfg))
    if job.partial is None:
        raise ValueError(f"sweep job {job.name}: a launched job needs the recipe's partial")
    if job.kind == "validate":
        return validate_partial(job.cfg, job.partial)
    return job.partial


def in_process_executor() -> Any:
    """One local process per task, using this environment's python (NeMo-Run runs ``python -m ...fdl_runner``).

    Each task gets its own free ``MASTER_PORT`` for its single-process torch.distributed group, so tasks running
    side by side (``--parallel K``) never share one (an inherited MASTER_PORT would make them collide).
    """
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    return run.LocalExecutor(ntasks_per_node=1, launcher=None, env_vars=env)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_experiment(jobs: list[SweepJob], *, parallel: int, base_dir: str | Path, detach: bool = False,
                   title: str = "ellama-sweep", dryrun: bool = False) -> dict[str, Any]:
    """Run ``jobs`` as one NeMo-Run experiment (K = ``parallel`` at a time) and wait for it (local) or return once
    submitted (``detach``, Slurm). Returns ``{"experiment", "states": {task: state}, "log_dir"}``.

    A failed task does not stop the others; the caller reads each point's run folder to see what finished.
    ``dryrun``: nothing runs and nothing stays on disk; returns ``{"launch": {task: sbatch script or command}}`` as
    NeMo-Run materializes them for the real launch (``base_dir`` is then a scratch folder).
    """
    base_dir = Path(base_dir).absolute()
    base_dir.mkdir(parents=True, exist_ok=True)
    k = max(int(parallel), 1)
    with nemo_run_home(base_dir), run.Experiment(title, base_dir=str(base_dir), log_level="WARN") as exp:
        ids: list[str] = []
        for i, job in enumerate(jobs):
            executor = job.executor if job.executor is not None else in_process_executor()
            deps = [ids[i - k]] if i >= k else None
            ids.append(exp.add(task(job), executor=executor, name=job.name, dependencies=deps))
        if dryrun:
            exp.dryrun(log=False, delete_exp_dir=True)
            return {"launch": {job.id: _dryrun_text(job._dryrun_info) for job in exp.jobs}}
        exp.run(sequential=False, detach=detach)
        states = {job.id: str(getattr(job, "state", "")) for job in exp.jobs}
        return {"experiment": exp._id, "states": states, "log_dir": str(exp._exp_dir)}


def _dryrun_text(info: Any) -> str:
    request = info.request
    if hasattr(request, "materialize"):  # Slurm: the sbatch script
        return request.materialize()
    return "\n".join(" ".join(role.args) for roles in request.role_params.values() for role in roles)


__all__ = ["SweepJob", "validate", "validate_partial", "run_validation", "task", "run_experiment"]
