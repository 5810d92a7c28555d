"""GPU leases on a real redis-server: all or nothing, first come first served, freed by a crash."""

from __future__ import annotations

import time

import pytest

from core import gpu_leases
from core.gpu_leases import Gpu, HostGpus, host_sizes
from tests.conftest import Env


def cards(count: int) -> list[Gpu]:
    return [Gpu(index=i, name="fake", uuid=f"GPU-fake-{i}") for i in range(count)]


@pytest.fixture
def host(env: Env) -> HostGpus:
    gpus = HostGpus(env.redis(), host="box")
    gpus.register(cards(4))
    return gpus


def test_a_job_gets_every_card_it_asks_for_or_none(host: HostGpus) -> None:
    assert host.try_acquire(1, 3) == [0, 1, 2]
    assert host.try_acquire(2, 2) == 1  # one card is free, it needs two: it waits, holding nothing
    assert host.holders() == {0: 1, 1: 1, 2: 1}
    host.release(1, [0, 1, 2])
    assert host.try_acquire(2, 2) == [0, 1]


def test_a_big_job_waiting_is_not_starved_by_small_jobs_that_come_after_it(host: HostGpus) -> None:
    assert host.try_acquire(1, 1) == [0]
    assert host.try_acquire(2, 4) == 1  # first in line; card 0 is busy
    # Three cards are free, but job 3 came after job 2: it may not take them.
    assert host.try_acquire(3, 1) == 2
    assert host.try_acquire(4, 1) == 3
    host.release(1, [0])
    assert host.try_acquire(3, 1) == 2  # still behind job 2
    assert host.try_acquire(2, 4) == [0, 1, 2, 3]
    host.release(2, [0, 1, 2, 3])
    assert host.try_acquire(3, 1) == [0]
    assert host.try_acquire(4, 1) == [1]  # several jobs at once, on disjoint cards
    assert host.waiting() == []


def test_no_two_waiters_each_hold_part_of_what_the_other_needs(host: HostGpus) -> None:
    # Jobs of 3 GPUs on a host of 4: whatever order they ask in, one holds three cards and the
    # other none, never two and two.
    for attempt in range(3):
        for job in (10, 11):
            host.try_acquire(job, 3)
        held = host.holders()
        assert sorted(list(held.values()).count(job) for job in (10, 11)) == [0, 3], (attempt, held)


def test_a_crashed_holder_or_waiter_lets_go_within_the_lease_time(
    host: HostGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_leases, "LEASE_TTL_S", 1)
    assert host.try_acquire(1, 4) == [0, 1, 2, 3]
    assert host.try_acquire(2, 4) == 1  # job 2 waits, then its worker dies: it stops asking
    assert host.try_acquire(3, 2) == 2
    time.sleep(1.5)  # job 1's worker died too: nobody renewed its lease
    assert host.holders() == {}
    assert host.try_acquire(3, 2) == [0, 1]  # job 2 lost its place in line


def test_a_renewed_lease_outlives_its_time_and_a_job_takes_its_own_cards_again(
    host: HostGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_leases, "LEASE_TTL_S", 1)
    assert host.try_acquire(1, 2) == [0, 1]
    for _ in range(3):
        time.sleep(0.5)
        assert host.renew(1, [0, 1]) == 2
    assert host.holders() == {0: 1, 1: 1}
    # The job's worker restarted and the job runs again: it gets its own cards back.
    assert host.try_acquire(1, 2) == [0, 1]


def test_the_api_knows_each_live_hosts_size(env: Env) -> None:
    HostGpus(env.redis(), host="small").register(cards(2))
    HostGpus(env.redis(), host="large").register(cards(8))
    assert host_sizes(env.redis()) == {"small": 2, "large": 8}


def test_workers_given_one_gpu_each_make_one_host_and_a_gone_workers_card_drops_out(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The classic layout: one worker per GPU (CUDA_VISIBLE_DEVICES=0, =1), same host.
    first, second = HostGpus(env.redis(), host="pair"), HostGpus(env.redis(), host="pair")
    first.register([Gpu(index=0, name="fake", uuid="GPU-a")])
    second.register([Gpu(index=1, name="fake", uuid="GPU-b")])
    assert [g.index for g in first.inventory()] == [0, 1]
    assert host_sizes(env.redis())["pair"] == 2
    assert first.try_acquire(7, 2) == [0, 1]
    first.release(7, [0, 1])

    monkeypatch.setattr(gpu_leases, "INVENTORY_TTL_S", 1)
    time.sleep(2.1)  # the second worker is gone: it stopped registering card 1
    first.register([Gpu(index=0, name="fake", uuid="GPU-a")])
    assert [g.index for g in first.inventory()] == [0]
    assert host_sizes(env.redis())["pair"] == 1
    assert first.try_acquire(8, 2) == 1  # card 1 is no longer the host's: it waits
