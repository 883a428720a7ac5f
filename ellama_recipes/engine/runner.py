"""Run a stage's partial: in this process (:func:`run_local`), or as the entry function of every launched rank.

The engine runs what it is given: the registry lookup, validation, input checks and ``build_partial`` happen in the
layer above (:func:`ellama_recipes.workflows.launch.run_in_process`, which ``ellama pretrain --size tiny --from CKPT --data
DIR/manifest.json --out RUN`` ends in). Multi-process launches (torchrun through NeMo-Run's LocalExecutor, Slurm)
run the very same partial, whose function starts with :func:`prepare_rank`; so everything that must happen during
training (metrics.jsonl, per-source validation, checkpoints, resume) lives in the partial.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ellama_recipes.config.schema import TrainConfig


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
        logs = Path(run_dir) / "logs" / "ranks"
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


def pretrain(model, data, trainer, log, optim, resume, run_dir: str | None = None):
    """The continued-pretraining entry function of every rank: :func:`prepare_rank`, then ``llm.pretrain``."""
    prepare_rank(run_dir)
    from nemo.collections import llm

    return llm.pretrain(model=model, data=data, trainer=trainer, log=log, optim=optim, resume=resume)


def run_local(cfg: TrainConfig, partial: Any) -> dict[str, Any]:
    """Run ``partial`` (the stage's ``run.Partial`` for ``cfg``) in this process and return a summary of the run.

    Nothing is looked up, validated or checked here: the caller passes a validated ``cfg`` and the partial its
    recipe built (:func:`ellama_recipes.workflows.launch.run_in_process` does all three). Returns ``{"final_step",
    "final_train_loss", "val_loss_domain", "val_loss_general", "resumed_from", "out_dir", "metrics"}``
    (``resumed_from`` is None for a fresh start). Without CUDA, the CPU redirects of
    :mod:`ellama_recipes.engine.cpu_compat` are applied first (fp32 only; bf16/fp8 are refused by validate).

    Layout of ``cfg.checkpoint.out_dir`` (RUN): ``checkpoints/`` (every ``save_every`` steps + the final one),
    ``metrics.jsonl``, ``resume.json``, ``logs/`` (NeMo text logs; TensorBoard under ``logs/tb_logs``).
    Re-running the same command after a crash resumes from the newest complete checkpoint.
    """
    import fiddle as fdl
    import torch

    out = Path(cfg.checkpoint.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        from ellama_recipes.engine import cpu_compat

        cpu_compat.prepare_cpu_process()
    fn = fdl.build(partial)
    fn()
    return summarize(out)


def summarize(out: str | Path) -> dict[str, Any]:
    """Summary of a run directory from its metrics.jsonl and resume record."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    last = recs[-1] if recs else {}
    val = [r for r in recs if "val_loss_domain" in r or "val_loss_general" in r]
    resumed = out / "resume.json"
    return {
        "final_step": last.get("step"),
        "final_train_loss": last.get("train_loss"),
        "val_loss_domain": val[-1].get("val_loss_domain") if val else None,
        "val_loss_general": val[-1].get("val_loss_general") if val else None,
        "resumed_from": json.loads(resumed.read_text()).get("resumed_from") if resumed.exists() else None,
        "out_dir": str(out),
        "metrics": str(metrics),
    }
