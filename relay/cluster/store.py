"""The Redis client the relays share state through (RELAY_REDIS_URL), and what a failure of it counts as.

Short timeouts and one retry without backoff (redis-py's default retries with backoff for seconds): a request that
needs Redis gets its answer, or the failure, within about a second. After a timeout (Redis unreachable rather than
refusing: a host gone dark) Redis is not asked for QUIET_S, so that requests do not each wait for it. What a
failure means is each caller's choice (limits fail open, single-use secrets fail closed); every one is counted
(relay_redis_errors_total{what}) and logged at most once per LOG_EVERY_S for each `what`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from relay.cluster.metrics import REDIS_ERRORS

log = logging.getLogger("relay.cluster")
TIMEOUT_S = 0.5  # to connect, and for an answer
QUIET_S = 1.0
LOG_EVERY_S = 10.0
_logged: dict[str, float] = {}


class SharedStateError(Exception):
    """Redis did not do what was asked (down, unreachable, too slow, or refused it)."""


class Store:
    """A Redis client, and until when it is not asked (after a timeout)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._quiet_until = 0.0

    @contextlib.asynccontextmanager
    async def guarded(self, what: str) -> AsyncIterator[Redis]:
        """Redis for commands about `what`; their failure is counted, logged now and then, and raised as
        SharedStateError (at once while Redis is quiet after a timeout)."""
        if time.monotonic() < self._quiet_until:
            raise _failed(what, RedisTimeout("quiet after a timeout"))
        try:
            yield self.redis
        except (RedisTimeout, asyncio.TimeoutError) as exc:
            self._quiet_until = time.monotonic() + QUIET_S
            raise _failed(what, exc) from exc
        except (RedisError, OSError) as exc:
            raise _failed(what, exc) from exc

    async def aclose(self) -> None:
        await self.redis.aclose()


def _failed(what: str, exc: Exception) -> SharedStateError:
    REDIS_ERRORS.labels(what).inc()
    now = time.monotonic()
    if now - _logged.get(what, -LOG_EVERY_S) >= LOG_EVERY_S:
        _logged[what] = now
        log.warning("redis unavailable for %s: %s", what, type(exc).__name__,
                    extra={"event": "redis_error", "what": what})
    return SharedStateError(what)


def connect(url: str) -> Store:
    """A client for RELAY_REDIS_URL; it connects on first use (a relay starts whether Redis is up or not)."""
    return Store(Redis.from_url(url, decode_responses=True, socket_timeout=TIMEOUT_S,
                                socket_connect_timeout=TIMEOUT_S,
                                retry=Retry(NoBackoff(), 1)))  # one retry: a pooled connection Redis closed
