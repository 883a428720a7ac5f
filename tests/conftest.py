"""Shared test helpers and session fixtures.

Session fixtures (built once per test run, in a ``tmp_path_factory`` directory, on first use):

- ``tiny_hf``     -> Path: the tiny HF Llama base (``build_tiny_base(seed=0)``: config.json, model.safetensors,
                     tokenizer files). The same weights ``ellama import-hf --size tiny`` builds for itself.
- ``tiny_base``   -> Path: the engine checkpoint of ``tiny_hf`` (``ellama import-hf --size tiny --from tiny_hf``
                     run as a fresh process: weights/, context/, ellama_import.json).
- ``tiny_data``   -> Path: the ``ellama data build`` output over the bundled sample (domain + general, ratio 1:1,
                     non_english 0.10, mix graph, tokenizer = ``tiny_hf``); the manifest is ``tiny_data / "manifest.json"``.
- ``tiny_inputs`` -> TinyInputs(hf, base, data, manifest): the three above together.

Helpers: ``subprocess_env()`` (a child environment without torch.distributed rendezvous variables, offline hub,
unbuffered), ``SAMPLE_DATA`` (the bundled sample folder).

Markers (pyproject.toml): ``slow`` (still run by ``make test``; deselect with ``-m "not slow"``), ``engine``,
``gpu``. Every test has a 900 s timeout (pytest-timeout); ``@pytest.mark.timeout(N)`` sets a smaller one.

At the end of the session every process started by the suite must be gone: a process that still carries this
session's marker variable is reported, killed, and the session fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Inherited by every child (subprocess, multiprocessing worker, resource tracker): the leak check finds them by it.
SESSION_MARKER = "ELLAMA_TEST_SESSION"
if not os.environ.get(SESSION_MARKER, "").startswith(f"{os.getpid()}-"):  # once per pytest process
    os.environ[SESSION_MARKER] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "ellama_recipes" / "sample_data"
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
               "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a fresh ``python -m ellama_recipes ...`` child: this one minus the torch.distributed
    rendezvous variables an in-process import/export exported, offline hub, unbuffered output."""
    # (megatron-core's NVTE_*_ATTN variables of an in-process model are put back by the product itself:
    # ellama_recipes.engine.process_env.in_process_model, tests/test_process_env.py)
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_console(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a fresh ``python -m ellama_recipes ...``) with stdout and stderr together into the file ``log``;
    the result's ``console`` holds what it printed (a file, not a pipe: a launch's torchrun children inherit it)."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), timeout=timeout)
    proc.console = log.read_text(errors="replace")  # type: ignore[attr-defined]
    return proc


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run `ellama ARGS...` in-process through the real entry point; returns exit code, stdout, stderr."""
    from ellama_recipes.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# ------------------------------------------------------------------------------------------------ tiny chain inputs


@dataclass(frozen=True)
class TinyInputs:
    hf: Path  # HF base (config.json, model.safetensors, tokenizer)
    base: Path  # engine checkpoint imported from ``hf``
    data: Path  # `ellama data build` output
    manifest: Path  # data / "manifest.json"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    from ellama_recipes.model.tiny import build_tiny_base

    out = build_tiny_base(tmp_path_factory.mktemp("tiny_hf") / "base_hf", seed=0)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_hf, tmp_path_factory) -> Path:
    """Engine checkpoint through the real CLI in a fresh process (keeps NeMo's process-group state out of pytest)."""
    out = tmp_path_factory.mktemp("tiny_base") / "base"
    proc = subprocess.run(
        [sys.executable, "-m", "ellama_recipes", "import-hf", "--size", "tiny", "--from", str(tiny_hf),
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "weights").is_dir() and (out / "context").is_dir()
    assert json.loads((out / "ellama_import.json").read_text())["all_equal"] is True
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_hf, tmp_path_factory) -> Path:
    from ellama_recipes.data.pipeline import build

    out = tmp_path_factory.mktemp("tiny_data") / "data"
    build(domain=[SAMPLE_DATA / "domain"], general=[SAMPLE_DATA / "general"], tokenizer=tiny_hf, out=out,
          ratio="1:1", non_english=0.10, mix="graph", progress=False)
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def tiny_inputs(tiny_hf, tiny_base, tiny_data) -> TinyInputs:
    return TinyInputs(hf=tiny_hf, base=tiny_base, data=tiny_data, manifest=tiny_data / "manifest.json")


# ------------------------------------------------------------------------------------------------ no leaked processes


def _marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every other live process whose environment carries ``SESSION_MARKER=marker``."""
    found: dict[int, str] = {}
    needle = f"{SESSION_MARKER}={marker}".encode()
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            if stat[stat.rindex(b")") + 2:][:1] == b"Z":  # a zombie: already dead, waiting to be reaped
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                found[int(entry.name)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
    return found


def _dies_with_pytest(pid: int, cmd: str) -> bool:
    """This process's own multiprocessing helpers end when it exits (their pipe closes)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError):
        return True
    return ppid == os.getpid() and ("multiprocessing.resource_tracker" in cmd or "multiprocessing.forkserver" in cmd)


def leaked_processes(grace_s: float = 10.0) -> dict[int, str]:
    """Processes started by this session that are still alive after ``grace_s`` seconds."""
    marker = os.environ.get(SESSION_MARKER, "")
    deadline = time.monotonic() + grace_s
    while True:
        live = {p: c for p, c in _marked_processes(marker).items() if not _dies_with_pytest(p, c)}
        if not live or time.monotonic() >= deadline:
            return live
        time.sleep(0.5)


def pytest_sessionfinish(session, exitstatus):
    if not sys.platform.startswith("linux") or hasattr(session.config, "workerinput"):
        return
    live = leaked_processes()
    if not live:
        return
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  pid {p}: {c[:200]}" for p, c in sorted(live.items()))
    session.config.get_terminal_writer().line(
        f"\nFAILED: {len(live)} process(es) started by the test session outlived it (now killed):\n{lines}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
