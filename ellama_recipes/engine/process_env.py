"""The process state the engine changes and must put back, in one place.

- :func:`nemo_run_home`: ``NEMORUN_HOME`` -> a run's base folder and an empty stdin around a NeMo-Run ``Experiment``
  (its Slurm packaging shells out through ``invoke``, which reads stdin, so a dry run or a launch then works without a
  terminal: CI, pytest capture).
- :func:`in_process_model`: around anything that builds a model in THIS process (an in-process run, an import's
  context dump, the export's logits check, the loss probes): the torch.distributed rendezvous variables Lightning
  exports for its one-process group (``MASTER_ADDR`` / ``MASTER_PORT`` ...; the c10d store keeps listening on that
  port after the group is gone, so a child started later would inherit a port in use) and the
  ``NVTE_{FLASH,FUSED,UNFUSED}_ATTN`` variables megatron-core's ``LanguageModule._set_attention_backend`` writes for
  the model's attention backend (and asserts in the next model: a later model, or a launched child, with another
  backend would fail on them). Both are restored on exit, whatever the model did.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
ATTENTION_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


@contextlib.contextmanager
def scoped_env(names: tuple[str, ...]) -> Iterator[None]:
    """Restore the environment variables ``names`` (set, changed or removed inside) on exit."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_process_model() -> contextlib.AbstractContextManager:
    """Scope of a model built in this process: rendezvous and attention-backend variables restored on exit."""
    return scoped_env(DIST_ENV + ATTENTION_ENV)


@contextlib.contextmanager
def nemo_run_home(base_dir: str | Path) -> Iterator[None]:
    old_home, old_stdin = os.environ.get("NEMORUN_HOME"), sys.stdin
    os.environ["NEMORUN_HOME"] = str(base_dir)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    try:
        yield
    finally:
        sys.stdin.close()
        sys.stdin = old_stdin
        if old_home is None:
            os.environ.pop("NEMORUN_HOME", None)
        else:
            os.environ["NEMORUN_HOME"] = old_home


__all__ = ["ATTENTION_ENV", "DIST_ENV", "in_process_model", "nemo_run_home", "scoped_env"]
