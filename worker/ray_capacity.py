"""The worker's look at the Ray cluster's alive nodes (core/ray_capacity.py says what for).

`python -m worker.ray_capacity ADDRESS` connects to the cluster as a driver, prints its alive
nodes as JSON and ends: a process of its own, because Ray's client keeps threads and sockets that
RQ's forked work horses must not inherit, and the worker itself never imports Ray."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from core.config import get_settings
from core.ray_capacity import RayNode, capacity_now, record_capacity
from worker.ray_placement import check_reachable

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120


class CapacityWatch:
    """Records the cluster's capacity at most every RAY_CAPACITY_INTERVAL_S (the worker calls
    `refresh` at start and at each maintenance pass). The look takes seconds (a Ray driver
    connects), so it runs on a thread: the worker takes jobs meanwhile."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.thread: threading.Thread | None = None

    def refresh(self, connection: Redis) -> None:
        settings = get_settings()
        interval = settings.ray_capacity_interval_s
        if not settings.ray_address or not interval:
            return
        if self.thread is not None and self.thread.is_alive():
            return
        if self.last is not None and time.monotonic() - self.last < interval:
            return
        self.last = time.monotonic()
        self.thread = threading.Thread(
            target=record, args=(connection, settings.ray_address), name="ray-capacity", daemon=True
        )
        self.thread.start()


def record(connection: Redis, address: str) -> None:
    nodes = probe(address)
    if nodes is None:
        return
    capacity = capacity_now(address, nodes)
    try:
        record_capacity(connection, capacity)
    except RedisError as exc:  # Redis away: the next look records it
        logger.warning("could not record the Ray cluster's capacity (%s)", exc)
        return
    logger.info("%s", capacity.describe())


def probe(address: str) -> list[RayNode] | None:
    """The cluster's alive nodes, or None when it cannot be reached (logged; nothing is recorded,
    and the API refuses nothing for the cluster's size)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.ray_capacity", address],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("could not ask the Ray cluster at %s for its nodes (%s)", address, exc)
        return None
    try:
        if done.returncode != 0:
            raise ValueError(f"exit code {done.returncode}")
        listed = json.loads(done.stdout.strip().splitlines()[-1])
        return [RayNode(str(n["host"]), float(n["gpus"]), float(n["cpus"])) for n in listed]
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        logger.warning("could not ask the Ray cluster at %s for its nodes (%s): %s", address, exc, tail)
        return None


def main(address: str) -> int:
    # Its own limit too: a worker that dies while it looks cannot kill it after PROBE_TIMEOUT_S
    # (seen: a probe left waiting in ray.init on a cluster that was gone).
    signal.alarm(PROBE_TIMEOUT_S)
    check_reachable(address)  # a head that takes no connection: fail now, not in ray.init
    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        nodes = [
            {
                "host": node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or node["NodeID"][:12],
                "gpus": node["Resources"].get("GPU", 0),
                "cpus": node["Resources"].get("CPU", 0),
            }
            for node in ray.nodes()  # type: ignore[no-untyped-call]
            if node.get("Alive")
        ]
    finally:
        ray.shutdown()
    print(json.dumps(nodes))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m worker.ray_capacity RAY_ADDRESS", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
