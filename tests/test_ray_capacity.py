"""The Ray cluster's room for ranks (core/ray_capacity.py), from the nodes a worker saw: what the
API's 422 for a job larger than the whole cluster counts. The real cluster's record is tested in
tests/test_ray_placement.py."""

from __future__ import annotations

import pytest

from core.ray_capacity import RayCapacity, RayNode

GPU_NODES = [RayNode("gpu-a", gpus=8, cpus=64), RayNode("gpu-b", gpus=4, cpus=6), RayNode("head", gpus=0, cpus=16)]


def capacity(nodes: list[RayNode], strategy: str, cpus_per_rank: float = 1.0) -> RayCapacity:
    return RayCapacity("10.0.0.1:6379", nodes, cpus_per_rank, strategy, seen=0.0)


@pytest.mark.parametrize(
    ("strategy", "cpus_per_rank", "most"),
    [
        ("PACK", 1.0, 12),  # every GPU; the head has none, so it places no rank
        ("SPREAD", 1.0, 12),
        ("STRICT_PACK", 1.0, 8),  # one node's
        ("STRICT_SPREAD", 1.0, 2),  # one rank a node with a GPU
        ("PACK", 2.0, 11),  # gpu-b's 6 CPUs feed 3 of its 4 GPUs
    ],
)
def test_ranks_of_a_gpu_cluster_are_its_gpus_that_have_cpus_beside_them(
    strategy: str, cpus_per_rank: float, most: int
) -> None:
    assert capacity(GPU_NODES, strategy, cpus_per_rank).most_ranks == most
    assert capacity(GPU_NODES, strategy, cpus_per_rank).unit == "GPU"


def test_ranks_of_a_cluster_without_gpus_are_its_cpus_over_ray_cpus_per_rank() -> None:
    nodes = [RayNode("a", gpus=0, cpus=1), RayNode("b", gpus=0, cpus=3.5)]
    assert capacity(nodes, "PACK").most_ranks == 4
    assert capacity(nodes, "PACK", cpus_per_rank=2).most_ranks == 1
    assert capacity(nodes, "STRICT_SPREAD").most_ranks == 2
    assert capacity(nodes, "STRICT_PACK").most_ranks == 3
    described = capacity(nodes, "PACK").describe()
    assert described == (
        "the Ray cluster at 10.0.0.1:6379 has room for 4 rank(s) at most under RAY_PLACEMENT_STRATEGY=PACK, "
        "each taking 1 CPUs (nodes: a: 1 (1 CPUs), b: 3 (3.5 CPUs))"
    )


def test_a_cluster_with_no_node_alive_has_room_for_nothing() -> None:
    assert capacity([], "PACK").most_ranks == 0
    assert "(nodes: none alive)" in capacity([], "PACK").describe()
