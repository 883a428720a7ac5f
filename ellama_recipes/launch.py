"""Launching a built recipe on a NeMo-Run executor (separate from building it: DESIGN.md practice 5).

- ``local``: one node. World size 1 runs in this process (the tiny CPU run); more GPUs run under torchrun through
  ``nemo_run.LocalExecutor(launcher="torchrun")``. With ``--nodes N > 1`` the dry run prints the torchrun command to
  start on every node (set NODE_RANK, MASTER_ADDR, MASTER_PORT there), e.g. from your own scheduler.
- ``slurm``: ``nemo_run.SlurmExecutor`` with torchrun inside a NeMo container (``cluster.container_image``), one
  sbatch job for all nodes. The dry run prints the sbatch script NeMo-Run would submit.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellama_recipes.errors import UserError
from ellama_recipes.recipe import PretrainConfig


@dataclass
class LaunchPlan:
    executor: str  # "in-process", "local" or "slurm"
    command: str | None = None  # torchrun command line (local)
    script: str | None = None  # sbatch script (slurm)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"executor": self.executor, "command": self.command, "script": self.script, "notes": self.notes}


def in_process(cfg: PretrainConfig) -> bool:
    return cfg.cluster.executor == "local" and cfg.cluster.world_size == 1


def job_dir(cfg: PretrainConfig) -> str:
    return cfg.cluster.job_dir or str(Path(cfg.checkpoint.out_dir).absolute() / "launch")


def make_executor(cfg: PretrainConfig, *, job_dir_override: str | None = None) -> Any:
    import nemo_run as run

    c = cfg.cluster
    if c.executor == "local":
        return run.LocalExecutor(ntasks_per_node=c.gpus_per_node, nodes=c.num_nodes, launcher="torchrun")
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
            tunnel=run.LocalTunnel(job_dir=job_dir_override or job_dir(cfg)),
            launcher="torchrun",
            env_vars={"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NVTE_FUSED_ATTN": "1", "NVTE_FLASH_ATTN": "1"},
        )
    raise UserError(f"Unknown executor {c.executor!r}. Valid executors: local, slurm.")


def _experiment_name(cfg: PretrainConfig) -> str:
    return f"ellama-cpt-{cfg.size}"


def render(cfg: PretrainConfig, partial: Any) -> LaunchPlan:
    """What launching would do, without launching: the torchrun command or the sbatch script."""
    if in_process(cfg):
        return LaunchPlan(
            executor="in-process",
            command=None,
            notes=["world size 1: llm.pretrain runs in this process (CPU smoke mode when no CUDA device exists)."],
        )
    import nemo_run as run

    with tempfile.TemporaryDirectory(prefix="ellama-dryrun-") as tmp:
        old_home, old_stdin = os.environ.get("NEMORUN_HOME"), sys.stdin
        os.environ["NEMORUN_HOME"] = tmp
        # NeMo-Run's Slurm packaging shells out through `invoke`, which reads stdin: give it an empty one so a
        # dry run works without a terminal (CI, pytest capture).
        sys.stdin = open(os.devnull)  # noqa: SIM115
        try:
            executor = make_executor(cfg, job_dir_override=str(Path(job_dir(cfg))))
            with run.Experiment(_experiment_name(cfg), executor=executor, log_level="ERROR", base_dir=tmp) as exp:
                exp.add(partial, name="pretrain")
                exp.dryrun(log=False, delete_exp_dir=True)
                info = exp.jobs[0]._dryrun_info
        finally:
            sys.stdin.close()
            sys.stdin = old_stdin
            if old_home is None:
                os.environ.pop("NEMORUN_HOME", None)
            else:
                os.environ["NEMORUN_HOME"] = old_home
    if cfg.cluster.executor == "slurm":
        notes = []
        if not cfg.cluster.slurm_account:
            notes.append("cluster.slurm_account is empty: set it with cluster.slurm_account=NAME if your cluster needs one.")
        return LaunchPlan(executor="slurm", script=info.request.materialize(), notes=notes)
    # The serialized config lives in NeMo-Run's experiment dir, written at launch (the dry run used a temp one).
    args = [a.replace(tmp, "$NEMORUN_HOME") for a in info.request.role_params["pretrain"][0].args]
    notes = ["The task config is serialized under $NEMORUN_HOME/experiments/ (default ~/.nemo_run) at launch."]
    if cfg.cluster.num_nodes > 1:
        args = _multi_node_torchrun(args)
        notes.append(
            f"Start this command on each of the {cfg.cluster.num_nodes} nodes with NODE_RANK=0..{cfg.cluster.num_nodes - 1}, "
            "MASTER_ADDR=<node 0 address> and MASTER_PORT=29500 set, or use --executor slurm."
        )
    return LaunchPlan(executor="local", command=" ".join(shlex.quote(a) if "$" not in a else a for a in args), notes=notes)


def _multi_node_torchrun(args: list[str]) -> list[str]:
    out = list(args)
    for flag, value in (("--node-rank", "$NODE_RANK"), ("--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT")):
        if flag in out:
            out[out.index(flag) + 1] = value
    return out


def launch(cfg: PretrainConfig, partial: Any) -> dict:
    """Launch for real. In-process runs return the training summary; others return the job handle."""
    if in_process(cfg):
        from ellama_recipes.engine.train import run_local

        return run_local(cfg)
    import nemo_run as run

    executor = make_executor(cfg)
    with run.Experiment(_experiment_name(cfg), executor=executor) as exp:
        exp.add(partial, name="pretrain")
        exp.run(detach=cfg.cluster.executor == "slurm", tail_logs=cfg.cluster.executor == "local")
        return {"experiment": exp._id, "executor": cfg.cluster.executor, "job_dir": job_dir(cfg)}
