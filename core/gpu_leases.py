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
- A job that cannot have its cards yet waits in the host's `...:waiting` sorted set; its
  `...:waiter:<job>` key holds its priority, project, need, its project's max_gpus and the
  planner's estimate of its run time. The line is ordered by priority, then fair share (the
  project holding fewer cards first), then submission order. Only the head may take cards: a
  4-GPU job is not starved by a stream of 1-GPU jobs taking each card as it frees, and since cards
  are taken all at once by one script, no two waiters ever each hold part of what the other needs
  (no deadlock). Conservative backfilling: a job behind the head starts on free cards only when
  the head starts no later for it (it ends before the head's start, judged from the estimates, or
  takes only cards the head will not need then). A waiter that stops refreshing its key (its
  worker died) loses its place. A job whose project holds its max_gpus waits without holding
  anyone up.

All of it is one Lua script per operation: Redis runs each atomically, so no two workers can
take the same card."""

from __future__ import annotations

import json
import socket
import time
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
    compute_capability: str | None = None  # "9.0" (NVML); None on a CPU host

    def describe(self) -> str:
        return f"GPU {self.index} ({self.name}, {self.uuid})"


def host_id() -> str:
    return get_settings().gpu_host_id or socket.gethostname()


def _prefix(host: str) -> str:
    return f"{get_settings().queue_name}:gpus:{host}"


# KEYS: inventory, waiting; ARGV: prefix, job id, cards needed, ticket, lease ttl, inventory ttl,
# the waiter's JSON ({priority, project, need, max_gpus, estimate_s}; -1: none). Returns {1, the card
# indices taken...}, {2, the job's place in line} or {3, the cards its project holds} (its quota is
# reached).
_ACQUIRE = """
local inventory, waiting = KEYS[1], KEYS[2]
local prefix, job, need, ticket, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local inventory_ttl = tonumber(ARGV[6])
redis.call('ZADD', waiting, 'NX', ticket, job)
redis.call('SET', prefix .. ':waiter:' .. job, ARGV[7], 'EX', ttl)
local now = tonumber(redis.call('TIME')[1])
local indices = {}
local entries = redis.call('HGETALL', inventory)
for i = 1, #entries, 2 do
  if now - tonumber(cjson.decode(entries[i + 1])['seen']) <= inventory_ttl then table.insert(indices, entries[i]) end
end
table.sort(indices, function(a, b) return tonumber(a) < tonumber(b) end)
-- the cards: free ones, those each project holds, and when each running job should end (-1: unknown)
local free, held, running = {}, {}, {}
for _, index in ipairs(indices) do
  local key = prefix .. ':lease:' .. index
  local holder = redis.call('GET', key)
  if holder == false or holder == job then
    table.insert(free, index)
  else
    local project = redis.call('GET', key .. ':project') or ''
    held[project] = (held[project] or 0) + 1
    local r = running[holder]
    if r == nil then
      r = {cards = 0, ends = tonumber(redis.call('GET', key .. ':ends') or '-1') or -1}
      running[holder] = r
    end
    r.cards = r.cards + 1
  end
end
-- the line: live waiters (a waiter of an older version wrote '1': the defaults)
local line, me = {}, nil
local members = redis.call('ZRANGE', waiting, 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local member = members[i]
  local raw = redis.call('GET', prefix .. ':waiter:' .. member)
  if raw == false then
    redis.call('ZREM', waiting, member)
  else
    local ok, info = pcall(cjson.decode, raw)
    if not ok or type(info) ~= 'table' then info = {} end
    local w = {job = member, ticket = tonumber(members[i + 1]), priority = tonumber(info['priority']) or 0,
               project = tostring(info['project'] or ''), need = tonumber(info['need']) or 1,
               max_gpus = tonumber(info['max_gpus']) or -1, estimate_s = tonumber(info['estimate_s']) or -1}
    table.insert(line, w)
    if member == job then me = w end
  end
end
local function within_quota(w)
  return w.max_gpus < 0 or (held[w.project] or 0) + w.need <= w.max_gpus
end
if not within_quota(me) then return {3, held[me.project] or 0} end
-- the order: the higher priority; then the project holding fewer cards (fair share); then the
-- job waiting longest. A waiter its project's quota holds back keeps no one else waiting.
local eligible = {}
for _, w in ipairs(line) do
  if within_quota(w) and w.need <= #indices then table.insert(eligible, w) end
end
table.sort(eligible, function(a, b)
  if a.priority ~= b.priority then return a.priority > b.priority end
  local ha, hb = held[a.project] or 0, held[b.project] or 0
  if ha ~= hb then return ha < hb end
  return a.ticket < b.ticket
end)
local place = 1
for i, w in ipairs(eligible) do if w.job == job then place = i end end
local head = eligible[1]
local function take()
  local ends = -1
  if me.estimate_s >= 0 then ends = now + me.estimate_s end
  local taken = {1}
  for i = 1, need do
    local key = prefix .. ':lease:' .. free[i]
    redis.call('SET', key, job, 'EX', ttl)
    redis.call('SET', key .. ':project', me.project, 'EX', ttl)
    redis.call('SET', key .. ':ends', ends, 'EX', ttl)
    table.insert(taken, tonumber(free[i]))
  end
  redis.call('ZREM', waiting, job)
  redis.call('DEL', prefix .. ':waiter:' .. job)
  return taken
end
if #free < need then return {2, place} end
if head.job == job then return take() end
-- Conservative backfilling: a job behind the head may start on free cards only if the head starts
-- no later for it. Cards the head leaves over, now, are free to take.
if #free - head.need >= need then return take() end
if #free >= head.need then return {2, place} end
-- The head waits for running jobs to end: when it can start (its shadow time) follows from their
-- expected ends; a job of unknown end makes that unknowable, and nothing is backfilled.
local order = {}
for _, r in pairs(running) do
  if r.ends < 0 then return {2, place} end
  table.insert(order, r)
end
table.sort(order, function(a, b) return a.ends < b.ends end)
local available, shadow = #free, nil
for _, r in ipairs(order) do
  available = available + r.cards
  if available >= head.need then
    shadow = r.ends
    break
  end
end
if shadow == nil then return {2, place} end
-- It ends before the head's start, or it takes only cards the head will not need then.
if (me.estimate_s >= 0 and now + me.estimate_s <= shadow) or need <= available - head.need then
  return take()
end
return {2, place}
"""

# ARGV: prefix, job id, ttl (0: release), the expected end (Unix seconds; '': as it is), card indices...
_RENEW_OR_RELEASE = """
local prefix, job, ttl, ends = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local kept = 0
for i = 5, #ARGV do
  local key = prefix .. ':lease:' .. ARGV[i]
  if redis.call('GET', key) == job then
    if ttl > 0 then
      redis.call('EXPIRE', key, ttl)
      redis.call('EXPIRE', key .. ':project', ttl)
      if ends ~= '' then
        redis.call('SET', key .. ':ends', ends, 'EX', ttl)
      else
        redis.call('EXPIRE', key .. ':ends', ttl)
      end
    else
      redis.call('DEL', key, key .. ':project', key .. ':ends')
    end
    kept = kept + 1
  end
end
return kept
"""


@dataclass(frozen=True)
class Waiter:
    """What the line needs to know of a waiting job besides its id and the cards it needs."""

    priority: int = 0
    project: str = ""
    max_gpus: int | None = None  # its project's quota (None: none)
    estimate_s: float | None = None  # how long it should run (the planner's estimate; None: unknown)

    def as_json(self, need: int) -> str:
        return json.dumps(
            {
                "priority": self.priority,
                "project": self.project,
                "need": need,
                "max_gpus": -1 if self.max_gpus is None else self.max_gpus,
                "estimate_s": -1 if self.estimate_s is None else round(self.estimate_s),
            }
        )


@dataclass(frozen=True)
class OverQuota:
    """The job's project holds this many cards, and one more start would put it over its max_gpus."""

    held: int


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

    def try_acquire(
        self, job_id: int, need: int, ticket: int | None = None, waiter: Waiter | None = None
    ) -> list[int] | int | OverQuota:
        """The card indices leased to the job (all `need` of them), its place in the line (1:
        next), or OverQuota when its project's running jobs hold all its max_gpus allows."""
        answer = self._acquire(
            keys=[self.inventory_key, self.waiting_key],
            args=[
                self.prefix,
                str(job_id),
                need,
                job_id if ticket is None else ticket,
                LEASE_TTL_S,
                INVENTORY_TTL_S,
                (waiter or Waiter()).as_json(need),
            ],
        )
        kind, values = int(answer[0]), [int(v) for v in answer[1:]]
        if kind == 1:
            return values
        if kind == 3:
            return OverQuota(values[0])
        return values[0]

    def renew(self, job_id: int, indices: list[int], ends_in_s: float | None = None) -> int:
        """Keep the job's leases alive (and, given, when it should end: the line's backfilling reads
        it); returns how many it still holds."""
        ends = "" if ends_in_s is None else str(int(time.time() + ends_in_s))
        return int(self._renew_or_release(args=[self.prefix, str(job_id), LEASE_TTL_S, ends, *indices]))

    def release(self, job_id: int, indices: list[int]) -> None:
        self._renew_or_release(args=[self.prefix, str(job_id), 0, "", *indices])

    def reclaim(self, job_id: int, indices: list[int], project: str = "") -> list[int]:
        """Take the job's own cards back after Redis lost their leases (it restarted without
        persistence); returns the cards another job holds meanwhile."""
        pipe = self.connection.pipeline()
        for index in indices:
            pipe.set(f"{self.prefix}:lease:{index}", str(job_id), nx=True, ex=LEASE_TTL_S)
        taken = pipe.execute()
        for index, ok in zip(indices, taken, strict=True):
            if ok:
                self.connection.set(f"{self.prefix}:lease:{index}:project", project, ex=LEASE_TTL_S)
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
