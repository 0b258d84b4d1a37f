"""Single-use client secrets across relays (RELAY_CLIENT_SECRET_SINGLE_USE with RELAY_REDIS_URL): a secret's first
use sets `relay:secret:<nonce>` (SET NX, expiring with the secret), atomically, so of any number of concurrent uses
at any relays exactly one gets it. Redis down: SharedStateError, and the caller refuses (fails closed).

Each use writes a value of its own: redis-py sends a command again when its answer timed out, and a SET NX whose
first sending took the key answers nil to its second. A nil is then checked against the stored value (the use that
took the key is the one whose value is there). A use whose call was not created gives the secret back (release),
deleting the key only if it still holds that use's value.
"""

from __future__ import annotations

import math
import secrets

from relay.cluster.store import Store

KEY = "relay:secret:{nonce}"
# Deletes the key only when it holds this use's value: a release never frees another use's take.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SingleUse:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._release = store.redis.register_script(RELEASE)

    async def consume(self, nonce: str, expires_at: float, now: float, use: str | None = None) -> str | None:
        """The secret's first use (anywhere): a value naming this use, for release(); None once it was used.
        `use`: the value to write (tests), else a random one."""
        use = use or secrets.token_urlsafe(12)
        key = KEY.format(nonce=nonce)
        ttl_s = max(1, math.ceil(expires_at - now))  # then the secret is refused as expired anyway
        async with self.store.guarded("secrets") as redis:
            if await redis.set(key, use, nx=True, ex=ttl_s):
                return use
            return use if await redis.get(key) == use else None  # a retried SET NX that took the key at first

    async def release(self, nonce: str, use: str) -> None:
        """Give the secret back: the call it was used for was not created."""
        async with self.store.guarded("secrets"):
            await self._release(keys=[KEY.format(nonce=nonce)], args=[use])
