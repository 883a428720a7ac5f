"""Run the continued-pretraining partial in this process (single process; the CPU smoke path when no CUDA).

``ellama pretrain --size tiny --from CKPT --data DIR/manifest.json --out RUN`` calls :func:`run_local`.
Multi-GPU launches go through NeMo-Run executors with the very same partial
(:func:`ellama_recipes.engine.nemo_recipe.build_pretrain_partial`), so everything that must happen during
training (metrics.jsonl, per-source validation, checkpoints, resume) lives in the partial, not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ellama_recipes.errors import UserError
from ellama_recipes.recipe import PretrainConfig, local_gpu_capability


def run_local(cfg: PretrainConfig) -> dict[str, Any]:
    """Train ``cfg`` in-process and return a summary.

    Returns ``{"final_step", "final_train_loss", "val_loss_domain", "val_loss_general", "resumed_from",
    "out_dir", "metrics"}`` (``resumed_from`` is None for a fresh start). Without CUDA the CPU path of
    :mod:`ellama_recipes.engine.cpu_compat` is applied first (fp32 only; bf16/fp8 are a UserError there).

    Layout of ``cfg.checkpoint.out_dir`` (RUN): ``checkpoints/`` (every ``save_every`` steps + the final one),
    ``metrics.jsonl``, ``resume.json``, ``logs/`` (NeMo text logs; TensorBoard under ``logs/tb_logs``).
    Re-running the same command after a crash resumes from the newest complete checkpoint.
    """
    import fiddle as fdl

    from ellama_recipes.engine.nemo_recipe import build_pretrain_partial

    cfg.validate(at_launch=True, gpu_capability=local_gpu_capability())
    src = cfg.checkpoint.restore_from
    if src and not ((Path(src) / "weights").is_dir() and (Path(src) / "context").is_dir()):
        raise UserError(
            f"--from {src} is not an engine checkpoint (expected weights/ and context/ inside). "
            f"Fix: create one with `ellama import-hf --size {cfg.size} --out DIR` and pass --from DIR."
        )
    out = Path(cfg.checkpoint.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = build_pretrain_partial(cfg)
    if not torch.cuda.is_available():
        from ellama_recipes.engine import cpu_compat

        cpu_compat.adapt_pretrain_partial(partial)
        cpu_compat.apply_training_redirects()
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
