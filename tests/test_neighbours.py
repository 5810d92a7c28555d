"""The slowdown watch: told once per fall below 70% of the best tokens/s, with other processes on
the card named as the cause when NVML lists any."""

from __future__ import annotations

import os

from trainer.neighbours import CardState, Neighbour, SlowdownWatch

GIB = 1024**3


def shared_card() -> CardState:
    return CardState(
        name="NVIDIA H200",
        uuid="GPU-1",
        total_bytes=140 * GIB,
        free_bytes=20 * GIB,
        neighbours=(Neighbour(4242, "python3", 110 * GIB), Neighbour(77, "(name unknown)", None)),
    )


def test_a_fall_is_told_once_with_the_neighbours_as_cause_and_again_after_recovery() -> None:
    watch = SlowdownWatch(card=shared_card)
    told = [watch.observe(tps) for tps in (500, 900, 2000, 2100, 1900, 1200, 1100, 1000, 2000, 1300)]
    # Two warm-up windows; best 2,100; 1,200 is below 70%; 1,100 and 1,000 are the same fall;
    # 2,000 (above 90%) ends it; 1,300 is a new fall.
    assert [i for i, message in enumerate(told) if message] == [5, 9]
    assert told[5] == (
        "tokens/s fell from 2,100 to 1,200 (-43%) while other processes hold 110.0 GiB of this GPU "
        "(pid 4242 python3 (110.0 GiB); pid 77 (name unknown) (memory not reported)) and 20.0 GiB is free: "
        "with less memory the paged optimizer moves its states between host and GPU memory, and the card's "
        "compute is shared"
    )


def test_a_fall_on_a_card_of_its_own_says_no_neighbour_was_found() -> None:
    watch = SlowdownWatch(card=lambda: None)
    told = [watch.observe(tps) for tps in (None, 1000, 1000, 1000, 600)]
    assert told[-1] == (
        "tokens/s fell from 1,000 to 600 (-40%); no other process holds memory on this GPU "
        "(evaluation or longer sequences can slow steps)"
    )
    assert told[:-1] == [None] * 4


def test_the_jobs_own_ranks_are_not_neighbours() -> None:
    """Ranks are siblings (children of one work horse): a rank's card listing leaves the others out,
    so their memory is not reported as someone else's."""
    import json
    import subprocess
    import sys

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        listed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, os; from trainer.neighbours import _job_processes as j; "
                "print(json.dumps([os.getpid(), sorted(j())]))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rank, own = json.loads(listed.stdout)
        assert rank in own and sibling.pid in own
        assert os.getpid() not in own  # the parent (the work horse) is not one of the ranks
    finally:
        sibling.kill()
        sibling.wait()
