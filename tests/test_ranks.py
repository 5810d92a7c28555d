"""The work horse's own ranks of a job on several GPUs (worker/ranks.py), without starting any: the
ranks themselves are tested in tests/test_multi_gpu.py."""

from __future__ import annotations

from worker.ranks import first_cause


def test_a_rank_killed_by_a_signal_is_named_before_the_peer_that_lost_it() -> None:
    """Both ranks seen ended in one poll (rank 0 exits 1 on gloo's reset as rank 1 is killed):
    the killed rank is the cause."""
    assert first_cause([(0, 1), (1, -9)]) == (1, -9)
    assert first_cause([(0, 1), (1, 2)]) == (0, 1)
    assert first_cause([(2, -15), (3, -9)]) == (2, -15)
