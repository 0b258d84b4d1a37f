"""Calls' transcripts in Redis, so that `GET …/transcript` and `?resume=` work at any relay once a call has ended,
even when its relay is gone (killed, or drained and stopped).

Key `relay:transcript:<call id>`: the JSON a transcript request answers (call_id, status, entries, entries_dropped,
usage) and the node that carried the call; written when the transcript changes (at most once a second per call)
and when the call ends; it expires `ttl_s` after its last write. Saved lags the call by up to a second: a node
killed at once loses its last second of transcript.

A record is at most MAX_RECORD_BYTES: a call holds up to 500 entries of any length (a client can make that over
100 MB), and Redis is shared with what must not fail (single-use secrets, limits, the registry), so only the
newest entries that fit are stored, the others counted in entries_dropped as the relay counts the entries it no
longer holds. Encoding walks back from the newest entry and stops at the bound: its work is bounded too.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Mapping

from relay.cluster.store import Store

KEY = "relay:transcript:{call_id}"
MAX_RECORD_BYTES = 256 * 1024  # per call: about 300 turns of conversation
SAVE_TIMEOUT_S = 1.0  # one round trip with a bounded batch; beyond it Redis counts as unavailable (tried again)
_SLACK = 32  # room for entries_dropped's digits, which grow as entries are left out


def record(call_id: str, status: str, node: str | None, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    return {"call_id": call_id, "status": status, "node": node, **snapshot}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # ASCII (ensure_ascii): a character is a byte


def encode(item: Mapping[str, Any], limit: int = MAX_RECORD_BYTES) -> str:
    """A record as JSON of at most `limit` bytes: its newest entries that fit, the others counted in
    entries_dropped (an entry longer than the bound on its own is left out too)."""
    entries = item.get("entries") or []
    rest = {**item, "entries": []}
    room = limit - len(_json(rest)) - _SLACK
    kept, used = 0, 0
    for entry in reversed(entries):  # newest first; stops at the bound, so never encodes the whole transcript
        used += len(_json(entry)) + 1
        if used > room:
            break
        kept += 1
    if kept == len(entries):
        return _json(item)
    dropped = int(item.get("entries_dropped") or 0) + len(entries) - kept
    return _json(rest | {"entries": entries[len(entries) - kept:], "entries_dropped": dropped})


def answer(stored: Mapping[str, Any], status: str | None = None) -> dict[str, Any]:
    """A stored record as a transcript request's answer (`status`: in place of the stored one)."""
    return {k: v for k, v in stored.items() if k != "node"} | ({"status": status} if status else {})


class Revisions:
    """Which live calls' transcripts changed since they were last saved (sans-I/O)."""

    def __init__(self) -> None:
        self._saved: dict[str, int] = {}  # in the order they were last saved: the oldest first

    def changed(self, revisions: Mapping[str, int]) -> list[str]:
        """The calls whose revision is not the saved one, those never saved first, then the longest unsaved: when
        a tick writes only some, the others come first next time. Calls no longer live are forgotten."""
        self._saved = {call_id: rev for call_id, rev in self._saved.items() if call_id in revisions}
        never = [call_id for call_id in revisions if call_id not in self._saved]
        return never + [call_id for call_id, rev in self._saved.items() if revisions[call_id] != rev]

    def saved(self, call_id: str, revision: int) -> None:
        self._saved.pop(call_id, None)
        self._saved[call_id] = revision


class Transcripts:
    def __init__(self, store: Store, ttl_s: int) -> None:
        self.store, self.ttl_s = store, ttl_s

    async def save(self, records: list[tuple[str, str]]) -> None:
        """Write (call id, encoded record) pairs in one round trip, in order (a call's ended record after its
        last live one), within SAVE_TIMEOUT_S."""
        async with self.store.guarded("transcripts") as redis:
            async with asyncio.timeout(SAVE_TIMEOUT_S):
                async with redis.pipeline(transaction=False) as pipe:
                    for call_id, text in records:
                        pipe.set(KEY.format(call_id=call_id), text, ex=self.ttl_s)
                    await pipe.execute()

    async def load(self, call_id: str) -> dict[str, Any] | None:
        async with self.store.guarded("transcripts") as redis:
            raw = await redis.get(KEY.format(call_id=call_id))
        try:
            stored = json.loads(raw) if raw else None
        except ValueError:
            return None
        return stored if isinstance(stored, dict) else None
