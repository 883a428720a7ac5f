"""Starting Ray for ``ellama data`` (issue 19): a local instance on loopback, or an existing cluster.

``init_ray()`` with no address starts a local Ray instance that talks over 127.0.0.1 only, without the dashboard.
``init_ray(address)`` connects to a running cluster (``ray.init(address=...)``; ``"auto"`` finds a local one).

Network rule on these machines: Ray advertises the host interface address even when told 127.0.0.1, so tests and
benchmarks run their Ray part inside a loopback-only network namespace; :func:`netns_command` builds that command
(``unshare -n sh -c 'ip link set lo up && exec ...'``, needs root) and :func:`private_ray_env` the environment with a
private ``HOME`` / temp dir (a stray ``~/.ray`` auth token would switch on token auth).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

LOOPBACK = "127.0.0.1"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (``address`` None and no ``RAY_ADDRESS``: local, loopback, no dashboard, ``num_cpus`` CPUs) or join
    (``address``, else ``$RAY_ADDRESS``) a Ray cluster; no-op if this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    kw: dict = {}
    tmp = os.environ.get("ELLAMA_RAY_TMPDIR")
    if tmp:
        kw["_temp_dir"] = tmp
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=False, **kw)


def node_addresses() -> list[str]:
    """``NodeManagerAddress`` of every alive node of the connected cluster."""
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))


def netns_command(argv: list[str]) -> list[str]:
    """``argv`` run inside a fresh loopback-only network namespace (``unshare -n``, then ``ip link set lo up``)."""
    return ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + shlex.join(argv)]


def private_ray_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for a child that starts Ray: private ``HOME``, ``TMPDIR`` and Ray temp dir under ``root``
    (kept short: Ray's socket paths must stay under 107 characters), no ``RAY_ADDRESS`` inherited."""
    root = Path(root)
    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), ELLAMA_RAY_TMPDIR=str(root / "r"),
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def short_tmp_root(prefix: str = "ellama-ray-") -> Path:
    """A short fresh directory under /tmp for :func:`private_ray_env` (Ray's unix socket paths are length-limited)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def python_in_netns(args: list[str]) -> list[str]:
    """``python ARGS`` (this interpreter) inside a loopback-only network namespace."""
    return netns_command([sys.executable, *args])
