"""How many ranks the Ray cluster (RAY_ADDRESS) has room for, as its workers last saw it, for the
API's 422 on a job larger than the whole cluster.

With Ray the workers register no GPUs of their own (a job may span hosts), so the per-host check
of the GPU line (core/gpu_leases.host_sizes) has nothing to say. Instead each worker asks Ray for
its alive nodes at start and at each maintenance pass, at most every RAY_CAPACITY_INTERVAL_S
(worker/ray_capacity.py), and records here what a job's ranks could use: on a node, a rank takes
one GPU and RAY_CPUS_PER_RANK CPUs (CPUs alone on a cluster without GPUs). The record lives for
INVENTORY_TTL_S, like a host's GPU inventory: with no live worker the API refuses nothing and the
job waits. An autoscaling cluster that grows on demand is larger than what it has now: set its
workers' RAY_CAPACITY_INTERVAL_S to 0 and nothing is recorded (docs/cluster.md)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from core.config import get_settings
from core.gpu_leases import INVENTORY_TTL_S


@dataclass(frozen=True)
class RayNode:
    host: str
    gpus: float
    cpus: float

    def ranks(self, cpus_per_rank: float) -> int:
        """Ranks that fit on this node: a GPU each (where the cluster has GPUs) and their CPUs."""
        by_cpu = math.floor(self.cpus / cpus_per_rank + 1e-9)
        return min(math.floor(self.gpus + 1e-9), by_cpu) if self.gpus else by_cpu


@dataclass(frozen=True)
class RayCapacity:
    address: str
    nodes: list[RayNode]
    cpus_per_rank: float
    strategy: str  # RAY_PLACEMENT_STRATEGY: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD
    seen: float

    @property
    def unit(self) -> str:
        return "GPU" if any(node.gpus for node in self.nodes) else "CPU"

    @property
    def most_ranks(self) -> int:
        """The largest job the cluster could place now, under the placement strategy: across nodes
        (PACK, SPREAD), on one node (STRICT_PACK), or one rank per node (STRICT_SPREAD)."""
        per_node = [node.ranks(self.cpus_per_rank) for node in self.nodes if self.unit == "CPU" or node.gpus]
        if not per_node:
            return 0
        if self.strategy == "STRICT_PACK":
            return max(per_node)
        if self.strategy == "STRICT_SPREAD":
            return sum(1 for ranks in per_node if ranks > 0)
        return sum(per_node)

    def describe(self) -> str:
        nodes = ", ".join(
            f"{node.host}: {node.ranks(self.cpus_per_rank)}"
            + (f" ({node.gpus:g} GPUs, {node.cpus:g} CPUs)" if self.unit == "GPU" else f" ({node.cpus:g} CPUs)")
            for node in self.nodes
        )
        per_rank = f"a GPU and {self.cpus_per_rank:g} CPUs" if self.unit == "GPU" else f"{self.cpus_per_rank:g} CPUs"
        return (
            f"the Ray cluster at {self.address} has room for {self.most_ranks} rank(s) at most under "
            f"RAY_PLACEMENT_STRATEGY={self.strategy}, each taking {per_rank} (nodes: {nodes or 'none alive'})"
        )


def capacity_key() -> str:
    return f"{get_settings().queue_name}:ray:capacity"


def record_capacity(connection: Redis, capacity: RayCapacity) -> None:
    connection.set(capacity_key(), json.dumps(asdict(capacity)), ex=INVENTORY_TTL_S)


def read_capacity(connection: Redis) -> RayCapacity | None:
    raw = connection.get(capacity_key())
    if raw is None:
        return None
    try:
        data: dict[str, Any] = json.loads(raw)
        return RayCapacity(
            address=str(data["address"]),
            nodes=[RayNode(str(n["host"]), float(n["gpus"]), float(n["cpus"])) for n in data["nodes"]],
            cpus_per_rank=float(data["cpus_per_rank"]),
            strategy=str(data["strategy"]),
            seen=float(data["seen"]),
        )
    except (ValueError, KeyError, TypeError):  # written by another version: say nothing
        return None


def capacity_now(address: str, nodes: list[RayNode]) -> RayCapacity:
    settings = get_settings()
    return RayCapacity(address, nodes, settings.ray_cpus_per_rank, settings.ray_placement_strategy, time.time())
