"""Resume from the newest *complete* checkpoint; skip partial or corrupt ones with a message.

NeMo's ``ModelCheckpoint`` writes ``<ckpt>-unfinished`` marker files around every save and NeMo's
``AutoResume`` only looks at ``*-last`` checkpoints: when the newest ``-last`` one is unfinished (a crash during
the save) it raises instead of falling back, and it never looks inside a checkpoint (a truncated shard or a
directory missing its metadata is picked and fails at load). :class:`SafeAutoResume` instead considers every
checkpoint directory in the run, checks each one (:func:`checkpoint_problem`), prints why any was skipped, and
resumes from the one with the highest step that is complete. With no usable checkpoint it falls back to the
``--from`` restore (initial weights), i.e. a fresh start.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from nemo import lightning as nl

_STEP = re.compile(r"--step=(\d+)-")


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a NeMo checkpoint directory name (``cpt--step=9-consumed_samples=80.0[-last]``)."""
    m = _STEP.search(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (None when it looks complete).

    Checks: the NeMo ``-unfinished`` marker; ``context/`` with ``io.json``; ``weights/`` with ``metadata.json``,
    ``common.pt`` and the torch distributed-checkpoint ``.metadata``; every shard file that ``.metadata`` refers
    to exists and is long enough for the byte ranges it lists (a file truncated by a crash fails this).
    """
    from nemo.lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint

    p = Path(path)
    real = p.resolve()  # `-last` entries are symlinks to the step checkpoint (save_last="link")
    if ModelCheckpoint.is_checkpoint_unfinished(p) or ModelCheckpoint.is_checkpoint_unfinished(real):
        return "partial: the save did not finish (its -unfinished marker is still there)"
    if checkpoint_step(p) is None:
        return "not a checkpoint directory name (no --step=N-)"
    if not real.is_dir():
        return f"missing: it points to {real}, which does not exist"
    return checkpoint_content_problem(real)


def checkpoint_content_problem(real: str | Path) -> str | None:
    """Why the checkpoint directory ``real`` is incomplete (None when complete); no naming rules.

    Shared by resume (trainer checkpoints) and ``ellama export-hf`` (any checkpoint this package writes, imported
    ones included): ``context/io.json``; ``weights/`` with ``metadata.json``, ``common.pt`` and ``.metadata``;
    every shard ``.metadata`` lists exists and is long enough for its byte ranges.
    """
    real = Path(real)
    weights, context = real / "weights", real / "context"
    if not (context / "io.json").is_file():
        return "corrupt: context/io.json is missing"
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (weights / name).is_file():
            return f"corrupt: weights/{name} is missing"
    try:
        json.loads((weights / "metadata.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "corrupt: weights/metadata.json is not valid JSON"
    try:
        with open(weights / ".metadata", "rb") as f:
            meta = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, ImportError, IndexError) as exc:
        return f"corrupt: weights/.metadata cannot be read ({type(exc).__name__})"
    storage = getattr(meta, "storage_data", None)
    if not isinstance(storage, dict) or not storage:
        return "corrupt: weights/.metadata lists no storage"
    need: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            return "corrupt: weights/.metadata has an entry without a file"
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in need.items():
        f = weights / rel
        if not f.is_file():
            return f"corrupt: weights/{rel} is missing"
        if f.stat().st_size < size:
            return f"corrupt: weights/{rel} is truncated ({f.stat().st_size} < {size} bytes)"
    return None


def find_resumable(checkpoint_dir: str | Path, *, report=print) -> Path | None:
    """The newest complete checkpoint under ``checkpoint_dir`` (None if there is none); skipped ones reported."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    candidates = sorted(
        (c for c in d.iterdir() if (c.is_dir() or c.is_symlink()) and checkpoint_step(c) is not None),
        key=lambda c: (checkpoint_step(c), c.name.endswith("-last")),
        reverse=True,
    )
    for c in candidates:
        problem = checkpoint_problem(c)
        if problem is None:
            return c
        report(f"[ellama] skipping checkpoint {c}: {problem}")
    return None


class SafeAutoResume(nl.AutoResume):
    """``nl.AutoResume`` that never picks a half-written checkpoint (see the module docstring)."""

    def _find_trainer_ckpt_path(self) -> Path | None:
        from nemo.utils.app_state import AppState

        if getattr(self, "_ellama_found", None) is not None:
            return self._ellama_found or None  # setup() asks twice (weights, then context); report once
        log_dir = AppState().log_dir
        if self.resume_from_directory:
            ckpt_dir = Path(self.resume_from_directory)
        elif log_dir is not None:
            ckpt_dir = Path(log_dir) / "checkpoints"
        else:
            return None
        found = find_resumable(ckpt_dir) if self.resume_if_exists else None
        self._ellama_found = found or False
        if found is not None:
            print(f"[ellama] resuming from checkpoint {found}", flush=True)
        elif self.restore_config is not None:
            print(f"[ellama] no complete checkpoint in {ckpt_dir}: starting from {self.restore_config.path}", flush=True)
        return found
