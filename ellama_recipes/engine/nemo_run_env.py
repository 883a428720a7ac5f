"""The process state NeMo-Run needs around an ``Experiment``, in one place (launch.py and the sweep use it).

``with nemo_run_home(base_dir): ...`` points ``NEMORUN_HOME`` at ``base_dir`` (where NeMo-Run keeps experiments)
and gives NeMo-Run an empty stdin: its Slurm packaging shells out through ``invoke``, which reads stdin, so a dry
run or a launch then works without a terminal (CI, pytest capture). Both are restored on exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator


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


__all__ = ["nemo_run_home"]
