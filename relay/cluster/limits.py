"""Cluster-wide call-creation limits: the token bucket of relay/server/limits.py (`rate` a second, bursts of `burst`),
kept in Redis so that every relay draws from the same one. One Lua script reads, refills and takes atomically, on
Redis' clock (the relays' clocks need not agree). Key `relay:rate:<kind>:<who>` (kind: ip or key; who: an address
or /64, or an API key's index, never the key), gone once the bucket would be full again."""

from __future__ import annotations

import math

from relay.cluster.store import Store

KEY = "relay:rate:{kind}:{who}"
# Returns the seconds until a token is there (0: taken), as a string (Redis makes a Lua number an integer).
TAKE = """
local rate, burst, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], ttl)
return tostring(wait)
"""


class SharedRateLimiter:
    def __init__(self, store: Store, kind: str, rate: float, burst: float) -> None:
        self.store, self.kind, self.rate, self.burst = store, kind, rate, burst
        self.ttl_s = math.ceil(burst / rate) + 1  # an untouched bucket is full again by then: as good as none
        self._take = store.redis.register_script(TAKE)

    async def take(self, who: str) -> float:
        """Take a token for `who`: 0.0 when allowed, else the seconds until one is there. SharedStateError when
        Redis cannot say (the caller fails open)."""
        async with self.store.guarded("limits"):
            wait = await self._take(keys=[KEY.format(kind=self.kind, who=who)],
                                    args=[repr(self.rate), repr(self.burst), self.ttl_s])
        return float(wait)
