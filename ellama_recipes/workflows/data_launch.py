"""``ellama data build --executor slurm``: a Ray cluster on Slurm plus the build, submitted through NeMo-Run.

The same ``cluster.*`` keys as training (:class:`ellama_recipes.config.schema.ClusterSpec`: ``cluster.num_nodes``,
``cluster.slurm_account``, ``cluster.slurm_partition``, ``cluster.slurm_time``, ``cluster.slurm_retries``,
``cluster.container_image``, ``cluster.job_dir``) build a ``nemo_run.SlurmExecutor`` (one task per node, whole
nodes, the NeMo container with ellama-recipes installed, as :func:`ellama_recipes.workflows.launch.make_executor`
does for training). NeMo-Run's ``RayJob`` (its ``SlurmRayJob`` / ``ray.sub.j2`` template) starts a Ray head on the
first node and a Ray worker on every other node, waits for them, then runs on the head node::

    ellama data build ... --executor ray --ray-address auto

so the build is the same command as a local one, on the job's Ray cluster. ``--dryrun`` prints exactly the sbatch
script NeMo-Run would submit (materialized by the same ``SlurmRayRequest`` the submission uses) and the command.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

from ellama_recipes.config.schema import ClusterSpec
from ellama_recipes.errors import UserError

SKIPPED = ("executor", "cpu_fallback", "gpus_per_node")  # keys of ClusterSpec that do not apply to a data build


def data_cluster(overrides: list[str]) -> ClusterSpec:
    """``cluster.KEY=VALUE`` pairs applied to a :class:`ClusterSpec` (executor slurm); unknown keys are errors."""
    c = ClusterSpec(executor="slurm")
    valid = [f.name for f in fields(ClusterSpec) if f.name not in SKIPPED]
    for item in overrides:
        key, _, raw = item.partition("=")
        name = key[len("cluster."):]
        if name not in valid or not _:
            raise UserError(f"Unknown or malformed cluster override {item!r}. Valid keys: "
                            + ", ".join(f"cluster.{k}" for k in valid) + " (cluster.KEY=VALUE).")
        cur = getattr(c, name)
        try:
            val: Any = int(raw) if isinstance(cur, int) else (None if raw.lower() in ("", "none") else raw)
        except ValueError:
            raise UserError(f"{item}: expected an integer.") from None
        setattr(c, name, val)
    if c.num_nodes < 1:
        raise UserError(f"cluster.num_nodes={c.num_nodes} must be >= 1.")
    return c


def make_executor(c: ClusterSpec, job_dir: str):
    import nemo_run as run

    return run.SlurmExecutor(
        account=c.slurm_account or "",
        partition=c.slurm_partition,
        nodes=c.num_nodes,
        ntasks_per_node=1,
        gpus_per_node=None,
        time=c.slurm_time,
        container_image=c.container_image,
        exclusive=True,
        mem="0",
        packager=run.Packager(),  # the container has ellama-recipes installed (see Dockerfile)
        tunnel=run.LocalTunnel(job_dir=job_dir),
        retries=c.slurm_retries,
        env_vars={"RAY_USAGE_STATS_ENABLED": "0"},
    )


def submit_build(cluster_overrides: list[str], argv: list[str], out: Path, *, dryrun: bool) -> dict:
    """Submit (or, ``dryrun``, render) the Slurm Ray job running ``ellama ARGV --executor ray --ray-address auto``."""
    from nemo_run.run.ray.slurm import SlurmRayRequest

    c = data_cluster(cluster_overrides)
    out = Path(out).absolute()
    job_dir = str(Path(c.job_dir).absolute()) if c.job_dir else str(out.parent / f"{out.name}.launch")
    name = f"ellama-data-{out.name}"
    command = shlex.join(["ellama", *argv, "--executor", "ray", "--ray-address", "auto"])
    executor = make_executor(c, job_dir)
    cluster_dir = os.path.join(job_dir, name)
    notes = [f"{c.num_nodes} node(s): Ray head on the first, a Ray worker on each other node (NeMo-Run RayJob, "
             f"template ray.sub.j2); then `{command}` on the head node.",
             f"Time limit cluster.slurm_time={c.slurm_time}; a killed or timed-out build resumes when the same "
             f"command is submitted again (finished stages and shards in {out.parent}/.{out.name}.partial are kept).",
             f"Job files and logs: {cluster_dir}."]
    if not c.slurm_account:
        notes.append("cluster.slurm_account is empty: set it with cluster.slurm_account=NAME if your cluster needs one.")
    if dryrun:
        script = SlurmRayRequest(name=name, cluster_dir=cluster_dir, template_name="ray.sub.j2", executor=executor,
                                 command=command, workdir=os.path.join(cluster_dir, "code"),
                                 launch_cmd=["sbatch", "--requeue", "--parsable", "--dependency=singleton"]
                                 ).materialize()
        return {"executor": "slurm", "command": command, "script": script, "notes": notes}
    from nemo_run.run.ray.job import RayJob

    workdir = Path(job_dir) / "workdir"
    workdir.mkdir(parents=True, exist_ok=True)
    job = RayJob(name=name, executor=executor)
    job.start(command=command, workdir=str(workdir))
    return {"executor": "slurm", "command": command, "job_id": getattr(job.backend, "job_id", None),
            "job_dir": cluster_dir, "notes": notes}
