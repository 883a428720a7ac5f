"""Starting Ray for ``ellama data`` (issue 19): a local instance on loopback, or an existing cluster.

``init_ray()`` with no address starts a local Ray instance that talks over 127.0.0.1 only, without the dashboard.
``init_ray(address)`` connects to a running cluster (``ray.init(address=...)``; ``"auto"`` finds a local one).
:func:`ray_session` is the build's connection (its CPU count, the node addresses it saw); ``_warm_workers`` and
``_map_blocks`` are how every Ray stage of :mod:`ellama_recipes.data.ray_build` gets its worker processes and tasks.

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
import time
from contextlib import contextmanager
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


# ------------------------------------------------------------------------------------------------ the build's Ray session
# (moved from data/ray_build.py: the session, the worker warm-up and the block-to-task mapping every Ray stage uses)


@contextmanager
def ray_session(address: str | None, num_cpus: int | None):
    """Connected to Ray for the build (local loopback instance when ``address`` is None, else the cluster);
    yields the cluster's CPU count. A local instance started here is shut down at the end."""
    import ray

    started = not ray.is_initialized()
    t0 = time.perf_counter()
    init_ray(address, num_cpus)
    SESSION["start_s"] = round(time.perf_counter() - t0, 2)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in block order (corpus order)
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
        SESSION["node_addresses"] = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})
    finally:
        if started:
            ray.shutdown()


SESSION: dict = {}  # what the last session saw (node addresses), for the report


def _warm_workers(n_cpus: int) -> None:
    """Fire (not wait for) one :func:`~ellama_recipes.data.ray_stages.warm_up` task per CPU (spread over the
    nodes): the workers import the scoring/tokenizing libraries while the driver does its own part."""
    import ray

    from ellama_recipes.data.ray_stages import warm_up

    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(warm_up)
    SESSION["warm_up"] = [task.remote() for _ in range(n_cpus)]  # refs held: the tasks are not cancelled


MIN_BLOCK_BYTES = 256 << 10  # no smaller blocks than this when sizing them to the input


def _block_size(block_bytes: int, paths, n_cpus: int) -> int:
    """Blocks of at most ``block_bytes``, but small enough that an input under ``n_cpus`` blocks still gives every
    CPU one (not below MIN_BLOCK_BYTES). Clean and score results do not depend on the blocking (every line keeps its
    file:line and corpus index); tokenized shards keep ``--shard-mb`` (they are the output)."""
    total = sum(Path(p).stat().st_size for p in paths)
    return max(1, min(block_bytes, max(MIN_BLOCK_BYTES, -(-total // max(1, n_cpus)))))


def _pool(n_cpus: int, n_blocks: int) -> int:
    return max(1, min(n_cpus, n_blocks))


def _map_blocks(rows: list[dict], cls, args: tuple, n_cpus: int):
    """``from_items(rows).map_batches(run_block, fn_args=(cls, args))``: one block per batch, one Ray task per
    block (up to n_cpus at a time). Tasks, not an actor pool per stage: the job's worker processes (prestarted when
    the driver connects) serve every stage, and :func:`~ellama_recipes.data.ray_stages.run_block` keeps each
    stage's loaded models per process, so a stage costs no process start-up (an actor pool started fresh processes
    for every stage: most of the fixed cost of a small build)."""
    import ray.data

    from ellama_recipes.data.ray_stages import run_block

    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    return ds.map_batches(run_block, fn_args=(cls, args), batch_size=1, batch_format="numpy",
                          concurrency=_pool(n_cpus, len(rows)), num_cpus=1)
