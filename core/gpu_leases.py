"""Which GPUs of a host a job may use: each host's inventory and leases on its cards, in Redis.

No GPU is ever used by two jobs at once, a job gets all the GPUs it asked for or none, and jobs
are served in the order they started waiting. docs/scheduling.md tells the whole design; in
short:

- Every worker of a host registers the cards it was given in the host's inventory
  (`<queue>:gpus:<host>:inventory`, a hash of card index -> {index, name, uuid, memory_bytes,
  seen}), refreshed at each maintenance pass. The inventory is the union of what the host's
  workers registered in the last INVENTORY_TTL_S (a card no live worker names drops out), so
  workers started each with one GPU (CUDA_VISIBLE_DEVICES=N) still make a host of N cards.
- A job holds a lease per card (`...:lease:<index>` = the job id), with a time to live that the
  work horse watching the job refreshes while it runs: a crashed worker's cards free themselves
  within LEASE_TTL_S. Several workers (RQ runs one job per worker process) share one host's
  inventory, so a host runs as many jobs at once as it has workers, each on its own cards.
- A job that cannot have its cards yet waits in the host's `...:waiting` sorted set, ordered by
  job id (submission order). Only the first waiter may take cards: a 4-GPU job is not starved by
  a stream of 1-GPU jobs taking each card as it frees, and since cards are taken all at once by
  one script, no two waiters ever each hold part of what the other needs (no deadlock). A waiter
  that stops refreshing its `...:waiter:<job>` key (its worker died) loses its place.

All of it is one Lua script per operation: Redis runs each atomically, so no two workers can
take the same card."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis

from core.config import get_settings

# A lease or a waiter not refreshed for this long is taken to be dead (its worker crashed).
LEASE_TTL_S = 60
INVENTORY_TTL_S = 180


@dataclass(frozen=True)
class Gpu:
    index: int  # as nvidia-smi numbers the card (CUDA_VISIBLE_DEVICES of the trainer)
    name: str
    uuid: str
    memory_bytes: int | None = None

    def describe(self) -> str:
        return f"GPU {self.index} ({self.name}, {self.uuid})"


def host_id() -> str:
    return get_settings().gpu_host_id or socket.gethostname()


def _prefix(host: str) -> str:
    return f"{get_settings().queue_name}:gpus:{host}"


# KEYS: inventory, waiting; ARGV: prefix, job id, cards needed, ticket, lease ttl, inventory ttl.
# Returns the card indices taken (all of them), or the job's place in the line (a negative
# number: -1 first but the cards are busy, -2 second, ...).
_ACQUIRE = """
local inventory, waiting = KEYS[1], KEYS[2]
local prefix, job, need, ticket, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local inventory_ttl = tonumber(ARGV[6])
redis.call('ZADD', waiting, 'NX', ticket, job)
redis.call('SET', prefix .. ':waiter:' .. job, '1', 'EX', ttl)
local place = 0
for _, other in ipairs(redis.call('ZRANGE', waiting, 0, -1)) do
  if redis.call('EXISTS', prefix .. ':waiter:' .. other) == 0 then
    redis.call('ZREM', waiting, other)
  else
    place = place + 1
    if other == job then break end
  end
end
if place ~= 1 then return -place end
local now = tonumber(redis.call('TIME')[1])
local indices = {}
local entries = redis.call('HGETALL', inventory)
for i = 1, #entries, 2 do
  if now - tonumber(cjson.decode(entries[i + 1])['seen']) <= inventory_ttl then table.insert(indices, entries[i]) end
end
table.sort(indices, function(a, b) return tonumber(a) < tonumber(b) end)
local free = {}
for _, index in ipairs(indices) do
  local holder = redis.call('GET', prefix .. ':lease:' .. index)
  if holder == false or holder == job then table.insert(free, index) end
end
if #free < need then return -1 end
local taken = {}
for i = 1, need do
  redis.call('SET', prefix .. ':lease:' .. free[i], job, 'EX', ttl)
  table.insert(taken, tonumber(free[i]))
end
redis.call('ZREM', waiting, job)
redis.call('DEL', prefix .. ':waiter:' .. job)
return taken
"""

# ARGV: prefix, job id, ttl (0: release), card indices...
_RENEW_OR_RELEASE = """
local prefix, job, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local kept = 0
for i = 4, #ARGV do
  local key = prefix .. ':lease:' .. ARGV[i]
  if redis.call('GET', key) == job then
    if ttl > 0 then redis.call('EXPIRE', key, ttl) else redis.call('DEL', key) end
    kept = kept + 1
  end
end
return kept
"""


class HostGpus:
    """One host's GPU inventory and the leases on it."""

    def __init__(self, connection: Redis, host: str | None = None) -> None:
        self.connection = connection
        self.host = host or host_id()
        self.prefix = _prefix(self.host)
        self._acquire = connection.register_script(_ACQUIRE)
        self._renew_or_release = connection.register_script(_RENEW_OR_RELEASE)

    @property
    def inventory_key(self) -> str:
        return f"{self.prefix}:inventory"

    @property
    def waiting_key(self) -> str:
        return f"{self.prefix}:waiting"

    def register(self, gpus: list[Gpu]) -> None:
        """Called by each worker of the host at start and at every maintenance: its cards join
        (or stay in) the host's inventory."""
        if not gpus:
            return
        now = self._now()
        pipe = self.connection.pipeline()
        pipe.hset(self.inventory_key, mapping={str(g.index): json.dumps({**asdict(g), "seen": now}) for g in gpus})
        pipe.expire(self.inventory_key, INVENTORY_TTL_S)
        pipe.execute()

    def _now(self) -> int:
        seconds, _micro = self.connection.time()  # Redis's clock, as the scripts read it
        return int(seconds)

    def inventory(self) -> list[Gpu]:
        """The host's cards some live worker registered in the last INVENTORY_TTL_S."""
        return fresh_cards(self.connection.hgetall(self.inventory_key), self._now())

    def try_acquire(self, job_id: int, need: int, ticket: int | None = None) -> list[int] | int:
        """The card indices leased to the job (all `need` of them), or its place in the line (1: next)."""
        answer = self._acquire(
            keys=[self.inventory_key, self.waiting_key],
            args=[self.prefix, str(job_id), need, job_id if ticket is None else ticket, LEASE_TTL_S, INVENTORY_TTL_S],
        )
        if isinstance(answer, list):
            return [int(i) for i in answer]
        return -int(answer)

    def renew(self, job_id: int, indices: list[int]) -> int:
        """Keep the job's leases alive; returns how many it still holds."""
        return int(self._renew_or_release(args=[self.prefix, str(job_id), LEASE_TTL_S, *indices]))

    def release(self, job_id: int, indices: list[int]) -> None:
        self._renew_or_release(args=[self.prefix, str(job_id), 0, *indices])

    def reclaim(self, job_id: int, indices: list[int]) -> list[int]:
        """Take the job's own cards back after Redis lost their leases (it restarted without
        persistence); returns the cards another job holds meanwhile."""
        pipe = self.connection.pipeline()
        for index in indices:
            pipe.set(f"{self.prefix}:lease:{index}", str(job_id), nx=True, ex=LEASE_TTL_S)
        taken = pipe.execute()
        return [
            index for index, ok in zip(indices, taken, strict=True) if not ok and self.holders().get(index) != job_id
        ]

    def leave_line(self, job_id: int) -> None:
        pipe = self.connection.pipeline()
        pipe.zrem(self.waiting_key, str(job_id))
        pipe.delete(f"{self.prefix}:waiter:{job_id}")
        pipe.execute()

    def holders(self) -> dict[int, int]:
        """Card index -> the job holding it now."""
        held = {}
        for gpu in self.inventory():
            holder = self.connection.get(f"{self.prefix}:lease:{gpu.index}")
            if holder is not None:
                held[gpu.index] = int(holder)
        return held

    def waiting(self) -> list[int]:
        members: list[bytes] = self.connection.zrange(self.waiting_key, 0, -1)  # type: ignore[assignment]
        return [int(m) for m in members]


def fresh_cards(entries: Mapping[Any, Any], now: int) -> list[Gpu]:
    cards = []
    for value in entries.values():
        entry = json.loads(value)
        if now - int(entry.pop("seen", 0)) <= INVENTORY_TTL_S:
            cards.append(Gpu(**entry))
    return sorted(cards, key=lambda g: g.index)


def host_sizes(connection: Redis) -> dict[str, int]:
    """Host -> the number of GPUs its live workers registered."""
    pattern = _prefix("*") + ":inventory"
    now = int(connection.time()[0])
    sizes = {}
    for key in connection.scan_iter(pattern):
        name = key.decode() if isinstance(key, bytes) else str(key)
        host = name[len(_prefix("")) : -len(":inventory")]
        count = len(fresh_cards(connection.hgetall(key), now))
        if count:
            sizes[host] = count
    return sizes
