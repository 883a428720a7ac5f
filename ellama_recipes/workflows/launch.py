"""Launching a stage's partial on a NeMo-Run executor (separate from building it: DESIGN.md practice 5).

Stage-agnostic: names come from the config (experiment ``cfg.experiment_name`` = ``ellama-<run_name>-<size>``, task
``cfg.stage``); the registry (``get_recipe(cfg.stage)``) is asked only for the stage's input checks (:func:`check`)
and its summary of the run folder (:func:`start`).

- :func:`check` (input files, the config for this host, the launch environment: once, every problem at once), then
  :func:`start`; :func:`launch` is both.
- ``local``: one node. World size 1 runs in this process (:func:`ellama_recipes.engine.runner.run_local` runs the
  partial; :func:`run_in_process`).
  More ranks run under torchrun through ``nemo_run.LocalExecutor(launcher="torchrun")``; ``torchrun`` is the one
  next to this interpreter (``sys.executable``'s bin folder, put first on the launched command's PATH), never
  whatever PATH holds.
  On a host without CUDA, a size with ``cluster.cpu_fallback`` runs its ranks as CPU processes over gloo (the same
  partial; :func:`ellama_recipes.engine.runner.prepare_rank` applies the CPU redirects in every rank).
  With ``--nodes N > 1`` the command has to be started on every node: NeMo-Run reads NODE_RANK, MASTER_ADDR and
  MASTER_PORT from the environment, so a real launch refuses to start without them.
- ``slurm``: ``nemo_run.SlurmExecutor`` with torchrun inside a NeMo container (``cluster.container_image``), one
  sbatch job for all nodes.

:func:`render` (the dry run) and :func:`launch` build the same executor and experiment through :func:`_experiment`;
the dry run prints the command / sbatch script NeMo-Run materializes from them, unedited.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ellama_recipes.errors import UserError
from ellama_recipes.io.run_folder import RunFolder
from ellama_recipes.config.schema import TrainConfig

MULTI_NODE_ENV = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class LaunchPlan:
    executor: str  # "in-process", "local" or "slurm"
    command: str | None = None  # torchrun command line (local)
    script: str | None = None  # sbatch script (slurm)
    script_file: str | None = None  # where the sbatch script was written (slurm)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "executor": self.executor,
            "command": self.command,
            "script": self.script,
            "script_file": self.script_file,
            "notes": self.notes,
        }


def in_process(cfg: TrainConfig) -> bool:
    return cfg.cluster.executor == "local" and cfg.cluster.world_size == 1


def job_dir(cfg: TrainConfig) -> str:
    """Where NeMo-Run writes the launch (serialized task, torchrun / sbatch scripts, logs): ``RUN/launch``."""
    return cfg.cluster.job_dir or str(RunFolder.of(cfg).launch)


def torchrun_path() -> Path:
    """The ``torchrun`` of this interpreter's environment (never looked up on PATH)."""
    path = Path(sys.executable).parent / "torchrun"
    if not path.is_file():
        raise UserError(
            f"torchrun was not found next to this Python ({sys.executable}): expected {path}. "
            "Fix: install torch into this environment (`pip install -c constraints.txt -e .`)."
        )
    return path


def launch_problems(cfg: TrainConfig) -> list[str]:
    """Launch-time checks that depend on this host's environment, not on the config."""
    c = cfg.cluster
    if c.executor == "local" and c.num_nodes > 1:
        missing = [k for k in MULTI_NODE_ENV if not os.environ.get(k)]
        if missing:
            return [
                f"--nodes {c.num_nodes} with the local executor starts torchrun on THIS node only, and "
                f"{', '.join(missing)} is not set. Fix: start the same command on each node with NODE_RANK=0.."
                f"{c.num_nodes - 1}, MASTER_ADDR=<node 0 address> and MASTER_PORT=29500 set, or use --executor slurm."
            ]
    return []


def make_executor(cfg: TrainConfig) -> Any:
    import nemo_run as run

    c = cfg.cluster
    if c.executor == "local":
        bin_dir = str(torchrun_path().parent)
        return run.LocalExecutor(
            ntasks_per_node=c.gpus_per_node,
            nodes=c.num_nodes,
            launcher="torchrun",
            # torchrun (the role's entrypoint) and the ranks' python resolve from this environment first.
            env_vars={
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONUNBUFFERED": "1",
                # torchrun's --local-ranks-filter: only local rank 0 on the console (all ranks stay in its logs)
                "PET_LOCAL_RANKS_FILTER": "0",
            },
        )
    if c.executor == "slurm":
        return run.SlurmExecutor(
            account=c.slurm_account or "",
            partition=c.slurm_partition,
            nodes=c.num_nodes,
            ntasks_per_node=c.gpus_per_node,
            gpus_per_node=c.gpus_per_node,
            time=c.slurm_time,
            container_image=c.container_image,
            exclusive=True,
            mem="0",
            packager=run.Packager(),  # the container has ellama-recipes installed (see Dockerfile)
            tunnel=run.LocalTunnel(job_dir=job_dir(cfg)),
            launcher="torchrun",
            retries=c.slurm_retries,
            env_vars={"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NVTE_FUSED_ATTN": "1", "NVTE_FLASH_ATTN": "1"},
        )
    raise UserError(f"Unknown executor {c.executor!r}. Valid executors: local, slurm.")


@contextlib.contextmanager
def _experiment(cfg: TrainConfig, partial: Any, base_dir: str) -> Iterator[Any]:
    """The NeMo-Run experiment of this launch (the one code path of the dry run and the real launch)."""
    import nemo_run as run

    from ellama_recipes.engine.process_env import nemo_run_home

    # NEMORUN_HOME -> base_dir and an empty stdin (NeMo-Run's Slurm packaging reads it), both restored on exit
    with nemo_run_home(base_dir), run.Experiment(
        cfg.experiment_name, executor=make_executor(cfg), log_level="ERROR", base_dir=base_dir
    ) as exp:
        exp.add(partial, name=cfg.stage)
        yield exp


def render(cfg: TrainConfig, partial: Any) -> LaunchPlan:
    """What launching would do, without launching: the torchrun command or the sbatch script (as NeMo-Run
    materializes them for the real launch)."""
    import tempfile

    if in_process(cfg):
        return LaunchPlan(
            executor="in-process",
            command=None,
            notes=["world size 1: the stage runs in this process (CPU processes when no CUDA device exists)."],
        )
    with tempfile.TemporaryDirectory(prefix="ellama-dryrun-") as tmp:
        with _experiment(cfg, partial, tmp) as exp:
            exp.dryrun(log=False, delete_exp_dir=True)
            info = exp.jobs[0]._dryrun_info
        if cfg.cluster.executor == "slurm":
            run_ckpts = Path(cfg.checkpoint.out_dir).expanduser().absolute() / "checkpoints"
            notes = [
                f"Time limit cluster.slurm_time={cfg.cluster.slurm_time}. A job that exits non-zero (a crashed rank, "
                f"a node failure) is requeued by the script (`scontrol requeue`, up to cluster.slurm_retries="
                f"{cfg.cluster.slurm_retries} times) and resumes from the newest complete checkpoint in {run_ckpts}. "
                "A job that reaches the time limit is ended by Slurm and not requeued: submit the same command again "
                f"to resume there (checkpoint.save_every={cfg.checkpoint.save_every} steps bounds the lost work).",
                f"A launch writes this script to {job_dir(cfg)}/{cfg.experiment_name}.sbatch.",
            ]
            if not cfg.cluster.slurm_account:
                notes.append(
                    "cluster.slurm_account is empty: set it with cluster.slurm_account=NAME if your cluster needs one."
                )
            script = info.request.materialize().replace(tmp, job_dir(cfg))
            return LaunchPlan(executor="slurm", script=script, notes=notes)
        role = info.request.role_params[cfg.stage][0]
        args = [a.replace(tmp, job_dir(cfg)) for a in role.args]
        entry = str(torchrun_path()) if Path(role.args[0]).name == "torchrun" else role.args[0]
    notes = [
        "Environment of the launch: PATH starts with this Python's bin folder; PET_LOCAL_RANKS_FILTER=0 (torchrun "
        "shows local rank 0 on the console).",
        f"The launch writes the serialized task and torchrun's logs under {job_dir(cfg)}/experiments/; ranks > 0 "
        f"log to {Path(cfg.checkpoint.out_dir).expanduser().absolute() / 'logs' / 'ranks'}/rank-N.log.",
    ]
    if cfg.cluster.num_nodes > 1:
        notes.extend(launch_problems(cfg) or [f"NODE_RANK={os.environ.get('NODE_RANK')} from the environment."])
    cmd = [entry] + args[1:]
    return LaunchPlan(executor="local", command=" ".join(cmd), notes=notes)


def write_sbatch(cfg: TrainConfig, plan: LaunchPlan) -> LaunchPlan:
    """Write a Slurm plan's sbatch script to ``RUN/launch/<experiment>.sbatch`` (atomically); sets script_file."""
    from ellama_recipes.io.atomic import write_text

    if plan.script is None:
        return plan
    path = Path(job_dir(cfg)) / f"{cfg.experiment_name}.sbatch"
    write_text(path, plan.script)
    plan.script_file = str(path)
    return plan


def check(cfg: TrainConfig) -> Any:
    """Everything that must hold before ``cfg`` (any registered stage) starts, checked once, all problems in one
    UserError: its input files first (fast, nothing heavy imported), then the config for this host
    (:meth:`~ellama_recipes.config.schema.TrainConfig.validate` at launch: ``--from``, a GPU for the GPU paths) and
    the host's launch environment (multi-node variables). Returns the stage's registered recipe."""
    from ellama_recipes.config.rules import local_gpu_capability
    from ellama_recipes.recipes import get_recipe

    recipe = get_recipe(cfg.stage)
    problems = recipe.check_inputs(cfg)
    if not problems:
        problems = cfg.problems(at_launch=True, gpu_capability=local_gpu_capability()) + launch_problems(cfg)
    if problems:
        raise UserError(f"Cannot start {cfg.title} ({cfg.size}): {len(problems)} problem(s):", problems=problems)
    return recipe


def start(cfg: TrainConfig, partial: Any) -> dict[str, Any]:
    """Run ``partial`` (the stage's, for a ``cfg`` that passed :func:`check`) on its executor, checking nothing
    again. In this process (world size 1, local): the stage's summary of its run folder. Launched: the experiment, its
    job folder and, for local torchrun launches, the final state with the stage's summary (a failed job is a
    UserError naming the failing rank's error); Slurm returns once the job is submitted."""
    from ellama_recipes.recipes import get_recipe

    recipe = get_recipe(cfg.stage)
    if in_process(cfg):
        from ellama_recipes.engine.runner import run_local

        run_local(partial, cfg.checkpoint.out_dir)
        return recipe.summarize(cfg.checkpoint.out_dir)
    base = job_dir(cfg)
    Path(base).mkdir(parents=True, exist_ok=True)
    Path(cfg.checkpoint.out_dir).mkdir(parents=True, exist_ok=True)
    slurm = cfg.cluster.executor == "slurm"
    with _experiment(cfg, partial, base) as exp:
        exp.run(detach=slurm, tail_logs=not slurm)
        job = exp.jobs[0]
    # NeMo-Run waits for the job when the experiment's context exits; the final state is set then.
    exp_dir, task_dir, exp_id = exp._exp_dir, job.executor.job_dir, exp._id
    state = str(getattr(job, "state", "UNKNOWN")).rsplit(".", 1)[-1]
    result = {"experiment": exp_id, "executor": cfg.cluster.executor, "job_dir": task_dir, "experiment_dir": exp_dir}
    if slurm:
        return {**result, "state": "SUBMITTED"}
    if state != "SUCCEEDED":
        raise UserError(
            f"The {cfg.title} launch failed (state {state}).", problems=[_failing_rank_error(cfg, task_dir)]
        )
    return {**recipe.summarize(cfg.checkpoint.out_dir), **result, "state": state}


def launch(cfg: TrainConfig, partial: Any = None) -> dict[str, Any]:
    """:func:`check` once, then :func:`start` the stage (its recipe's partial when none is given)."""
    recipe = check(cfg)
    return start(cfg, recipe.build_partial(cfg) if partial is None else partial)


def run_in_process(cfg: TrainConfig, partial: Any = None) -> dict[str, Any]:
    """Train ``cfg`` (any registered stage, world size 1 on the local executor) in this process: :func:`check`,
    build its partial when none is given, run it (:func:`ellama_recipes.engine.runner.run_local`); returns the
    stage's summary of its run folder."""
    if not in_process(cfg):
        raise UserError(f"{cfg.title} on {cfg.cluster.world_size} ranks ({cfg.cluster.executor}) does not run in this "
                        "process. Fix: use ellama_recipes.workflows.launch.launch(cfg).")
    return launch(cfg, partial)


def _failing_rank_error(cfg: TrainConfig, task_dir: str) -> str:
    """The first failing rank's error: the last traceback in its log (rank 0: torchrun's log, ranks > 0:
    RUN/logs/rank-N.log)."""
    logs = sorted(RunFolder.of(cfg).rank_logs.glob("rank-*.log"))
    candidates = [*Path(task_dir).rglob("*.out"), *Path(task_dir).rglob("*.log"), *logs]
    found = []
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        i = text.rfind("Traceback (most recent call last)")
        if i >= 0:
            found.append((path.stat().st_mtime, path, text[i:]))
    if not found:
        return f"No traceback found; see the logs under {task_dir} and {Path(cfg.checkpoint.out_dir) / 'logs'}."
    _, path, tb = min(found, key=lambda x: x[0])  # the earliest failure is the cause; the others follow it
    lines = [line[2:] if line.startswith(": ") else line for line in tb.strip().splitlines()]
    error = next((line for line in reversed(lines) if line and not line.startswith(" ")), lines[-1])
    frames = [line for line in lines[1:] if line.startswith("  File ")][-4:]
    return f"{error}\n    (from {path}; last frames:)\n" + "\n".join(frames)


__all__ = ["LaunchPlan", "check", "in_process", "job_dir", "launch", "make_executor", "render", "run_in_process",
           "start", "torchrun_path", "write_sbatch"]
