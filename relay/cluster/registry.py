"""The node registry in Redis: each relay's workers say, every BEAT_S, how the relay is reached (its
RELAY_ADVERTISE_URL), whether it serves or drains, and their calls and capacity.

Key `relay:node:<node id>`, a hash with one field per worker (its index) holding a JSON entry; each beat sets the
key's TTL to TTL_S, so a node whose workers all stopped beating leaves the registry within TTL_S. An entry older
than STALE_S (one worker stuck, or stopped while others beat) does not count.

Two relays started with the same node id would share one key, each taking the other's calls' requests: each beat
reads the node's entries as it writes, and an entry beaten within SAME_NODE_S with another address names the other
relay.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable

from relay.cluster.store import Store

KEY = "relay:node:{node}"
BEAT_S = 1.0
TTL_S = 5
STALE_S = 5.0
# Beaten this recently: a live relay (beats are BEAT_S apart). A relay killed and started again at a new address
# (a pod's new IP) takes longer than this to beat again, so its old entries do not look like another relay.
SAME_NODE_S = 1.5 * BEAT_S


@dataclass(frozen=True)
class Entry:
    url: str
    state: str  # "serving" or "draining"
    calls: int  # this worker's calls, those being set up included
    capacity: int  # its share of RELAY_MAX_CALLS
    at: float  # unix time of the beat

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> "Entry | None":
        try:
            fields = json.loads(raw)
            return cls(str(fields["url"]), str(fields["state"]), int(fields["calls"]), int(fields["capacity"]),
                       float(fields["at"]))
        except (ValueError, KeyError, TypeError):
            return None


def live_url(entries: Iterable[Entry | None], now: float) -> str | None:
    """The node's address, if any of its workers beat within STALE_S."""
    fresh = [entry for entry in entries if entry is not None and now - entry.at <= STALE_S]
    return max(fresh, key=lambda entry: entry.at).url if fresh else None


def other_urls(entries: Iterable[Entry | None], url: str, now: float) -> set[str]:
    """Addresses other than `url` beaten under this node id just now: another relay with the same node id."""
    return {entry.url for entry in entries
            if entry is not None and entry.url != url and now - entry.at <= SAME_NODE_S}


class Registry:
    def __init__(self, store: Store, node: str, worker: int) -> None:
        self.store, self.node, self.worker = store, node, worker

    async def beat(self, entry: Entry) -> list[Entry | None]:
        """Write this worker's entry; the node's entries as they were just before (read first: a relay with the
        same node id and worker index overwrites this one's field, so its entry shows only before the write)."""
        key = KEY.format(node=self.node)
        async with self.store.guarded("registry") as redis:
            async with redis.pipeline(transaction=True) as pipe:
                fields, *_ = await pipe.hgetall(key).hset(key, str(self.worker), entry.encode()) \
                    .expire(key, TTL_S).execute()
        return [Entry.decode(raw) for raw in fields.values()]

    async def leave(self) -> None:
        """This worker stops: its entry goes (the node leaves when its last worker does)."""
        async with self.store.guarded("registry") as redis:
            await redis.hdel(KEY.format(node=self.node), str(self.worker))

    async def lookup(self, node: str, now: float) -> str | None:
        async with self.store.guarded("registry") as redis:
            fields = await redis.hgetall(KEY.format(node=node))
        return live_url(map(Entry.decode, fields.values()), now)

    async def nodes(self, now: float) -> dict[str, list[Entry]]:
        """Every registered node's fresh entries (for operators and tests)."""
        found: dict[str, list[Entry]] = {}
        async with self.store.guarded("registry") as redis:
            async for key in redis.scan_iter(match=KEY.format(node="*"), count=100):
                entries = [Entry.decode(raw) for raw in (await redis.hgetall(key)).values()]
                fresh = [e for e in entries if e is not None and now - e.at <= STALE_S]
                if fresh:
                    found[key.rsplit(":", 1)[1]] = fresh
        return found
