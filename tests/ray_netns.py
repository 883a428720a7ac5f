"""Run a Python snippet that starts Ray inside a loopback-only network namespace (the network rule of issue 19).

``run_ray_snippet(code, tmp)`` writes ``code`` to a file and runs it with this interpreter under
``unshare -n sh -c 'ip link set lo up && exec python FILE'`` (root needed), with a private HOME / TMPDIR / Ray temp
dir (a stray ``~/.ray`` token would switch on token auth) and the test session's environment (so the suite's leak
check sees its processes). The snippet should call ``ellama_recipes.data.ray_env.init_ray()``, assert that the node
address is 127.0.0.1 and ``ray.shutdown()`` at the end. For ad-hoc checks: the Ray tests share ONE cluster start
(tests/test_ray_data.py's scenario, which also runs tests/test_dedup.py's Ray case).
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

from ellama_recipes.data.ray_env import private_ray_env, python_in_netns, short_tmp_root

ROOT = Path(__file__).resolve().parents[1]


def netns_available() -> str | None:
    """None when ``unshare -n`` + ``ip`` work here, else the reason (for a skip message)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare/ip not installed"
    p = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if p.returncode:
        return f"cannot create a network namespace (needs root): {p.stderr.strip()}"
    return None


def run_ray_snippet(code: str, tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    tmp = Path(tmp)
    script = tmp / "ray_snippet.py"
    script.write_text(textwrap.dedent(code))
    root = short_tmp_root()
    try:
        return subprocess.run(python_in_netns([str(script)]), capture_output=True, text=True, timeout=timeout,
                              cwd=str(tmp), env=private_ray_env(root, PYTHONPATH=str(ROOT)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
