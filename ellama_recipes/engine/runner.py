"""Run a stage's partial: in this process (:func:`run_local`), or as the entry function of every launched rank.

The engine runs what it is given: the registry lookup, validation, input checks and ``build_partial`` happen in the
layer above (:func:`ellama_recipes.workflows.launch.run_in_process`, which ``ellama pretrain --size tiny --from CKPT --data
DIR/manifest.json --out RUN`` ends in). Multi-process launches (torchrun through NeMo-Run's LocalExecutor, Slurm)
run the very same partial, whose function starts with :func:`prepare_rank`; so everything that must happen during
training (metrics.jsonl, per-source validation, checkpoints, resume, complete.json: :func:`finish_stage`) lives in
the partial.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ellama_recipes.io.run_folder import RunFolder


def prepare_rank(run_dir: str | None = None) -> None:
    """What every rank does before training (every stage's entry function calls it first).

    - No CUDA: the runtime CPU redirects of :mod:`ellama_recipes.engine.cpu_compat` (gloo, CPU tensors).
    - Launched by torchrun with ``RANK`` > 0: this process's stdout/stderr go to ``RUN/logs/ranks/rank-N.log``
      (rank 0 keeps the console), so the console shows one rank's progress, not N interleaved copies. (A folder:
      NeMo moves the loose files of RUN/logs into run_N/ on every restart.) The launcher shows only local rank 0
      on the console (``PET_LOCAL_RANKS_FILTER=0``), so import-time output of other ranks stays in torchrun's
      per-rank logs in the job folder.
    - ``ELLAMA_FAIL_RANK=N``: rank N raises here (fault injection for the launch's failure handling).
    """
    import torch

    rank = int(os.environ.get("RANK", "0"))
    if run_dir and rank > 0 and os.environ.get("ELLAMA_RANK_LOGS", "1") != "0":
        logs = RunFolder.at(run_dir).rank_logs
        logs.mkdir(parents=True, exist_ok=True)
        f = open(logs / f"rank-{rank}.log", "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    fail = os.environ.get("ELLAMA_FAIL_RANK")
    if fail is not None and fail.strip() == str(rank):  # fault injection: how a crashing rank is tested
        raise RuntimeError(f"ELLAMA_FAIL_RANK={fail}: rank {rank} fails on purpose (fault-injection hook).")
    if not torch.cuda.is_available():
        from ellama_recipes.engine import cpu_compat

        cpu_compat.prepare_cpu_process()


def finish_stage(trainer, run_dir: str | None, report: dict | None) -> None:
    """After a stage's training returned, on rank 0: ``RUN/complete.json`` when every step is done.

    ``report`` is the stage's own summary spec, given by its recipe (``{"stage", "step_key", "fields"}``,
    :func:`ellama_recipes.io.run_folder.summarize`); the record names the newest complete checkpoint (what ``ellama
    align`` chains from and skips on re-runs; null when the run saved none, which align does not count as done). Launched (torchrun / Slurm) runs leave it too: the entry function of
    every rank calls this.
    """
    if not (run_dir and report and trainer.global_rank == 0 and trainer.max_steps
            and trainer.global_step >= trainer.max_steps):
        return
    from ellama_recipes.engine.resume import find_resumable
    from ellama_recipes.io.run_folder import RunFolder, summarize

    folder = RunFolder.at(run_dir)
    ckpt = find_resumable(folder.checkpoints)  # None when the run saved none (checkpointing switched off)
    summary = summarize(run_dir, report["stage"], report["fields"], step_key=report["step_key"])
    folder.write_complete(report["stage"], int(trainer.max_steps), ckpt, summary)


def run_local(partial: Any, run_dir: str | Path) -> None:
    """Run ``partial`` (a stage's ``run.Partial``) in this process, in the run folder ``run_dir``.

    Nothing is looked up, validated or checked here: the caller passes the partial its recipe built for a validated
    config (:func:`ellama_recipes.workflows.launch.run_in_process` does all three) and reads the run folder after.
    Without CUDA, the CPU redirects of :mod:`ellama_recipes.engine.cpu_compat` are applied first (fp32 only;
    bf16/fp8 are refused by validate). The process's rendezvous and attention-backend variables are restored
    afterwards (:func:`ellama_recipes.engine.process_env.in_process_model`). Re-running the same partial after a
    crash resumes from the newest complete checkpoint of ``RUN/checkpoints``.
    """
    import fiddle as fdl
    import torch

    from ellama_recipes.engine.process_env import in_process_model

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        from ellama_recipes.engine import cpu_compat

        cpu_compat.prepare_cpu_process()
    with in_process_model():
        fdl.build(partial)()
