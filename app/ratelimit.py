"""Per-token request rates, counted in Redis across every API process.

Each token has a generic cell rate algorithm (GCRA, pyrate-limiter's `GCRA` over its
`RedisStateStore`: one small hash per token, updated by one Lua script, atomically): a token of N
requests a minute may send N at once, then one every 60/N s. A refused request gets 429 with
Retry-After, the seconds until the next one is allowed. Once refused, a token is refused by this
process from memory until then, so a client that hammers the API costs Redis nothing more. Requests
are paid for in batches (CREDIT_MAX), so a busy token costs one round trip per batch.

Redis unreachable: requests pass (logged), rather than every request of every token failing.

The script runs on the API's threads with the synchronous client (its pool is thread-safe): an
asyncio client's connections belong to one event loop, and a Redis that hangs must not stall
the loop."""

from __future__ import annotations

import logging
import math
import time

import anyio.to_thread
from pyrate_limiter import GCRA, Decision, Duration, Rate, RedisStateStore
from redis import Redis
from redis.exceptions import RedisError

from core.config import get_settings

logger = logging.getLogger(__name__)
# An outage is logged at most this often.
OUTAGE_LOG_EVERY_S = 60.0
# A process pays Redis for a token's requests in batches of about a second's allowance (N a minute:
# N/60), at most this many, and admits them from memory: a Redis round trip per batch, not per
# request. The limit is never exceeded (every admitted request was paid for); a token whose
# requests move between API processes may be refused up to a batch a process early.
CREDIT_MAX = 100
ALGORITHM = GCRA()


class RateLimiter:
    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self._client = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._stores: dict[str, RedisStateStore] = {}
        self._refused_until: dict[str, float] = {}  # key -> time.monotonic() when it may ask again
        self._credit: dict[str, int] = {}  # key -> requests this process paid for in Redis and has left
        self._outage_logged_at = float("-inf")
        self.redis_calls = 0  # tests and the benchmark read it

    def _store(self, key: str) -> RedisStateStore:
        store = self._stores.get(key)
        if store is None:
            if len(self._stores) > 10_000:
                self._stores.clear()
            store = self._stores[key] = RedisStateStore(self._client, f"{self.key_prefix}:{key}")
        return store

    def check(self, key: str, per_minute: int, weight: int = 1) -> Decision:
        """One GCRA step in Redis for `weight` requests (blocking)."""
        rate = Rate(per_minute, Duration.MINUTE)
        decision: Decision = self._store(key).check(  # type: ignore[no-untyped-call]
            ALGORITHM, [rate], int(time.time() * 1000), weight
        )
        return decision

    async def admit(self, key: str, per_minute: int) -> float | None:
        """None when the request may go on; else the seconds to wait (for Retry-After)."""
        credit = self._credit.get(key, 0)
        if credit > 0:  # paid for in Redis already
            self._credit[key] = credit - 1
            return None
        now = time.monotonic()
        refused_until = self._refused_until.get(key)
        if refused_until is not None:
            if now < refused_until:
                return refused_until - now
            del self._refused_until[key]
        batch = min(max(per_minute // 60, 1), CREDIT_MAX)
        try:
            self.redis_calls += 1
            decision = await anyio.to_thread.run_sync(self.check, key, per_minute, batch)
            if not decision.allowed and batch > 1:  # less than a batch left: take one at a time
                batch = 1
                self.redis_calls += 1
                decision = await anyio.to_thread.run_sync(self.check, key, per_minute, 1)
        except (RedisError, OSError) as exc:
            if now - self._outage_logged_at > OUTAGE_LOG_EVERY_S:
                self._outage_logged_at = now
                logger.warning("rate limits not applied: Redis cannot be reached (%s)", exc)
            return None
        if decision.allowed:
            if batch > 1:
                if len(self._credit) > 10_000:
                    self._credit.clear()
                self._credit[key] = batch - 1
            return None
        wait_s = (decision.retry_after_ms or 1000) / 1000
        if len(self._refused_until) > 10_000:
            self._refused_until.clear()
        self._refused_until[key] = now + wait_s
        return wait_s


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))


_limiters: dict[tuple[str, str], RateLimiter] = {}


def get_limiter() -> RateLimiter:
    settings = get_settings()
    key = (settings.redis_url, settings.queue_name)
    limiter = _limiters.get(key)
    if limiter is None:
        _limiters.clear()
        limiter = _limiters[key] = RateLimiter(settings.redis_url, f"{settings.queue_name}:ratelimit")
    return limiter
