"""Single-use client secrets across relays (RELAY_CLIENT_SECRET_SINGLE_USE with RELAY_REDIS_URL): a secret's first
use sets `relay:secret:<nonce>` (SET NX, expiring with the secret), atomically, so of any number of concurrent uses
at any relays exactly one gets it. Redis down: SharedStateError, and the caller refuses (fails closed)."""

from __future__ import annotations

import math

from relay.cluster.store import Store

KEY = "relay:secret:{nonce}"


class SingleUse:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def consume(self, nonce: str, expires_at: float, now: float) -> bool:
        """True for the secret's first use, False once it was used (anywhere)."""
        ttl_s = max(1, math.ceil(expires_at - now))  # then the secret is refused as expired anyway
        async with self.store.guarded("secrets") as redis:
            return bool(await redis.set(KEY.format(nonce=nonce), "used", nx=True, ex=ttl_s))
