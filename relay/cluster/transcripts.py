"""Calls' transcripts in Redis, so that `GET …/transcript` and `?resume=` work at any relay once a call has ended,
even when its relay is gone (killed, or drained and stopped).

Key `relay:transcript:<call id>`: the JSON a transcript request answers (call_id, status, entries, entries_dropped,
usage) and the node that carried the call; written when the transcript changes (at most once a second per call)
and when the call ends; it expires `ttl_s` after its last write. Saved lags the call by up to a second: a node
killed at once loses its last second of transcript.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from relay.cluster.store import Store

KEY = "relay:transcript:{call_id}"


def record(call_id: str, status: str, node: str | None, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    return {"call_id": call_id, "status": status, "node": node, **snapshot}


def answer(stored: Mapping[str, Any], status: str | None = None) -> dict[str, Any]:
    """A stored record as a transcript request's answer (`status`: in place of the stored one)."""
    return {k: v for k, v in stored.items() if k != "node"} | ({"status": status} if status else {})


class Revisions:
    """Which live calls' transcripts changed since they were last saved (sans-I/O)."""

    def __init__(self) -> None:
        self._saved: dict[str, int] = {}

    def changed(self, revisions: Mapping[str, int]) -> list[str]:
        """The calls whose revision is not the saved one; calls no longer live are forgotten."""
        self._saved = {call_id: rev for call_id, rev in self._saved.items() if call_id in revisions}
        return [call_id for call_id, rev in revisions.items() if self._saved.get(call_id) != rev]

    def saved(self, call_id: str, revision: int) -> None:
        self._saved[call_id] = revision


class Transcripts:
    def __init__(self, store: Store, ttl_s: int) -> None:
        self.store, self.ttl_s = store, ttl_s

    async def save(self, records: list[dict[str, Any]]) -> None:
        """Write records in one round trip, in order (a call's ended record after its last live one)."""
        async with self.store.guarded("transcripts") as redis:
            async with redis.pipeline(transaction=False) as pipe:
                for item in records:
                    pipe.set(KEY.format(call_id=item["call_id"]), json.dumps(item, separators=(",", ":")),
                             ex=self.ttl_s)
                await pipe.execute()

    async def load(self, call_id: str) -> dict[str, Any] | None:
        async with self.store.guarded("transcripts") as redis:
            raw = await redis.get(KEY.format(call_id=call_id))
        try:
            stored = json.loads(raw) if raw else None
        except ValueError:
            return None
        return stored if isinstance(stored, dict) else None
