"""The console filter of `ellama quickstart` (ellama_recipes.io.console): engine lines to the log, ours on screen.

Each case runs in a child process, whose real stdout the test captures: the filter works on file descriptors 1 and 2
(C-level writes, forked children), which pytest's own capture would hide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from ellama_recipes.io.console import console_to_log

    out = Path(sys.argv[1]); verbose = sys.argv[2] == "1"
    print("before", flush=True)
    with console_to_log(out / "a.log", verbose=verbose) as logs:
        print("[ellama] step 1: loss 2.0", flush=True)
        print("[NeMo I 2026-12-04 megatron_init:314] Rank 0 has data parallel group", flush=True)
        logging.getLogger("lightning").warning("GPU available: False, used: False")
        warnings.warn("a library warning")
        os.write(2, b"fd2 from C\\n")
        subprocess.run([sys.executable, "-c", "print('child line'); print('[ellama] child progress')"])
        logs.switch(out / "b.log")
        print("[quickstart] stage two", flush=True)
        sys.stdout.write("tqdm 10%\\rtqdm 100%\\n"); sys.stdout.flush()
        # a forked helper that outlives the block and still holds the pipe
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5); print('late line')"])
    print("after", flush=True)
""")


def _run(tmp_path, verbose: bool) -> str:
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "1" if verbose else "0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout + p.stderr


def test_only_ellama_lines_reach_the_console_and_every_line_reaches_the_log(tmp_path):
    shown = _run(tmp_path, verbose=False).splitlines()
    assert shown == ["before", "[ellama] step 1: loss 2.0", "[ellama] child progress", "[quickstart] stage two",
                     "after"]
    a, b = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    for line in ("[NeMo I", "GPU available: False", "a library warning", "fd2 from C", "child line",
                 "[ellama] step 1"):
        assert line in a, line
    assert "[quickstart] stage two" in b and "tqdm 100%" in b and "[NeMo" not in b


def test_verbose_shows_every_line(tmp_path):
    shown = _run(tmp_path, verbose=True)
    for line in ("[NeMo I", "GPU available: False", "fd2 from C", "child line", "[quickstart] stage two", "after"):
        assert line in shown, line
    assert "late line" not in shown  # written after the block: to the log, never onto the console
