"""Atomic outputs: the one place where a temporary file or folder is renamed into place.

A reader never sees a half-written result: work happens in a hidden temporary sibling (same folder, same file
system), which replaces the target with one ``os.replace`` only once it is complete. A failure (or Ctrl-C) deletes
the temporary and leaves any existing target untouched.

- :func:`atomic_dir`: a whole output folder (an export, a data build, a merge).
- :func:`atomic_path`: one file written by someone else's writer (``torch.save``, ``fig.savefig``, a builder).
- :func:`write_text`, :func:`write_bytes`, :func:`write_json`: one small file.
- :func:`replace_all`: several files that belong together (``.bin`` + ``.idx``), each renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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
    if out.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Output {out} appeared while writing it (another process?); nothing was overwritten.")
    replace_dir(tmp, out)


def replace_dir(src: Path, out: Path) -> None:
    """Put the finished folder ``src`` (a sibling of ``out``) in place of ``out``; an existing ``out`` is moved
    aside first and deleted after (a resumable build's work folder, :mod:`ellama_recipes.data.ray_build`)."""
    src, out = Path(src), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(src, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer to fill; on success it replaces ``path``.

    ``suffix`` keeps an extension some writers look at (``fig.savefig`` picks the format from ``.png``).
    ``fsync``: flush the file to disk before the rename (records that must survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept, unknown types as ``str``, one trailing newline) atomically."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n", fsync=fsync)


def replace_all(pairs: list[tuple[str | Path, str | Path]]) -> None:
    """Rename each finished temporary ``src`` onto its ``dst`` (files that belong together, renamed last-first
    so that the first one's presence means all are there)."""
    for src, dst in reversed(pairs):
        os.replace(src, dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["atomic_dir", "atomic_path", "replace_all", "replace_dir", "write_bytes", "write_json", "write_text"]
