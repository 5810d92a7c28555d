"""GPU leases on a real redis-server: all or nothing, first come first served, freed by a crash."""

from __future__ import annotations

import time

import pytest

from core import gpu_leases
from core.gpu_leases import Gpu, HostGpus, OverQuota, Waiter, host_sizes
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


# ---- priorities, fair share, project quotas and backfilling (docs/scheduling.md) ------------------


def test_a_higher_priority_job_goes_first_whatever_its_place(host: HostGpus) -> None:
    assert host.try_acquire(1, 4) == [0, 1, 2, 3]
    assert host.try_acquire(2, 1, waiter=Waiter(priority=0)) == 1
    assert host.try_acquire(3, 1, waiter=Waiter(priority=5)) == 1  # ahead of job 2 now
    host.release(1, [0, 1, 2, 3])
    assert host.try_acquire(2, 4, waiter=Waiter(priority=0)) == 2  # job 3 is the head
    assert host.try_acquire(3, 1, waiter=Waiter(priority=5)) == [0]


def test_when_all_wait_the_project_holding_fewer_cards_goes_first(host: HostGpus) -> None:
    busy = Waiter(project="1")
    assert host.try_acquire(1, 3, waiter=busy) == [0, 1, 2]
    assert host.try_acquire(2, 1, waiter=busy) == [3]
    # Project 1 submitted first, but holds 4 cards; project 2 holds none: its job is served first.
    assert host.try_acquire(3, 1, waiter=busy) == 1
    assert host.try_acquire(4, 1, waiter=Waiter(project="2")) == 1
    assert host.try_acquire(3, 1, waiter=busy) == 2
    host.release(2, [3])
    assert host.try_acquire(3, 1, waiter=busy) == 2
    assert host.try_acquire(4, 1, waiter=Waiter(project="2")) == [3]


def test_a_project_at_its_max_gpus_waits_without_holding_up_the_others(host: HostGpus) -> None:
    capped = Waiter(project="1", max_gpus=2)
    assert host.try_acquire(1, 2, waiter=capped) == [0, 1]
    assert host.try_acquire(2, 1, waiter=capped) == OverQuota(held=2)
    assert host.try_acquire(3, 2, waiter=Waiter(project="2")) == [2, 3]  # not behind job 2
    host.release(1, [0, 1])
    assert host.try_acquire(2, 1, waiter=capped) == [0]


def test_backfilling_starts_a_small_job_only_when_the_head_starts_no_later(host: HostGpus) -> None:
    # Job 1 holds 3 cards and should end in an hour; job 2 needs all 4: it waits at the head.
    assert host.try_acquire(1, 3, waiter=Waiter(estimate_s=3600)) == [0, 1, 2]
    assert host.try_acquire(2, 4, waiter=Waiter(estimate_s=3600)) == 1
    # Card 3 is free. A job of unknown length could hold it past the hour: not started.
    assert host.try_acquire(3, 1) == 2
    # One of two hours would delay the head: not started. One of ten minutes ends before: started.
    assert host.try_acquire(4, 1, waiter=Waiter(estimate_s=7200)) == 3
    assert host.try_acquire(5, 1, waiter=Waiter(estimate_s=600)) == [3]
    # Once job 1 reports its ETA (renewals carry it), a job that ends before it may take a card.
    host.release(5, [3])
    host.renew(1, [0, 1, 2], ends_in_s=300)
    assert host.try_acquire(4, 1, waiter=Waiter(estimate_s=7200)) == 3  # would still delay the head
    assert host.try_acquire(6, 1, waiter=Waiter(estimate_s=200)) == [3]


def test_nothing_is_backfilled_while_a_running_jobs_end_is_unknown(host: HostGpus) -> None:
    assert host.try_acquire(1, 3) == [0, 1, 2]  # no estimate: when it ends is unknown
    assert host.try_acquire(2, 4) == 1
    assert host.try_acquire(3, 1, waiter=Waiter(estimate_s=1)) == 2
