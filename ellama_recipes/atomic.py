"""Atomic output folders: work happens in a hidden temp folder beside the output, renamed into place at the end.

A failure (or Ctrl-C) deletes the temp folder and leaves any existing output untouched, so a reader never sees a
half-written result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ellama_recipes.errors import UserError


@contextmanager
def atomic_dir(out: Path, *, replace: bool) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out`` that becomes ``out`` on success.

    ``replace=True``: an existing ``out`` is swapped out only after the new folder is complete (re-runs).
    ``replace=False``: an existing ``out`` is an error up front (nothing is overwritten, e.g. an export).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is a file. Pass a folder path.")
    if out.exists() and not replace:
        raise UserError(f"Output {out} already exists; choose a new --out or remove it first.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder the user makes
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"Output {out} appeared while writing it (another process?); nothing was overwritten.")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
