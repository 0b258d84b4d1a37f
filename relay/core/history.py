"""One call's conversation as text, and what it cost, sans-I/O.

Fed the upstream's events, the client's events and the relay's own truncations, it keeps:
- the user's turns (input transcriptions, and text messages a client adds);
- the model's turns as the user heard them: an audio transcript is cut where the user interrupted (the relay knows
  how much of the item's audio was played; the words are cut in proportion, the full text is kept beside);
- tool calls and their outputs;
- token usage from every `response.done`, with an estimated cost from the configured prices.

Each new entry is also handed out once by `take_new()`, for an append-only log (one JSON Lines file per call).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from relay.core.call import new_event

# Entries a call holds in memory: ~170 turns (a transcript entry per user turn, reply and usage). A call's
# memory must not grow with its length (20 calls talking for 30 minutes would hold ~50 MB); the log in
# RELAY_HISTORY_DIR keeps every entry, and a new upstream session gets the conversation from these.
MAX_ENTRIES = 500
MAX_PARTIAL_CHARS = 64 * 1024  # words kept of one reply under way (a reply of 15 minutes is about 15,000 chars)
USAGE_FIELDS = ("audio_input", "cached_audio_input", "text_input", "cached_text_input", "audio_output", "text_output")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_tokens(usage: Any) -> dict[str, int]:
    """A Realtime `usage` object as the six billed kinds of token (cached input counted apart, not twice)."""
    usage = _dict(usage)
    given = _dict(usage.get("input_token_details"))
    cached = _dict(given.get("cached_tokens_details"))
    out = _dict(usage.get("output_token_details"))
    cached_audio, cached_text = _count(cached.get("audio_tokens")), _count(cached.get("text_tokens"))
    return {
        "audio_input": max(0, _count(given.get("audio_tokens")) - cached_audio),
        "cached_audio_input": cached_audio,
        "text_input": max(0, _count(given.get("text_tokens")) - cached_text),
        "cached_text_input": cached_text,
        "audio_output": _count(out.get("audio_tokens")),
        "text_output": _count(out.get("text_tokens")),
    }


def cost_usd(tokens: dict[str, int], prices: dict[str, float]) -> float:
    return sum(tokens.get(kind, 0) * prices.get(kind, 0.0) for kind in USAGE_FIELDS) / 1e6


@dataclass
class Usage:
    responses: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_FIELDS, 0))
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"responses": self.responses, "tokens": dict(self.tokens),
                "input_tokens": sum(v for k, v in self.tokens.items() if k.endswith("input")),
                "output_tokens": sum(v for k, v in self.tokens.items() if k.endswith("output")),
                "cost_usd": round(self.cost_usd, 6)}


class History:
    def __init__(self, prices: dict[str, float], clock=time.time, max_entries: int = MAX_ENTRIES) -> None:
        self.entries: list[dict[str, Any]] = []  # the last max_entries (all of them are in RELAY_HISTORY_DIR's log)
        self.max_entries = max_entries
        self.next_seq = 0  # the seq of the next entry: entries[i]["seq"] grows by one, from the first ever
        self.dropped = 0  # entries no longer held in memory (the oldest)
        self.revision = 0  # changes with every entry added or corrected (a new session's replay may be out of date)
        self.usage = Usage()
        self._prices = prices
        self._clock = clock
        self._new: list[dict[str, Any]] = []
        self._heard: dict[str, tuple[int, int]] = {}  # item_id -> (audio_end_ms, audio_received_ms)
        self._by_item: dict[str, dict[str, Any]] = {}  # assistant entries, to cut one when it is interrupted
        self._users: dict[str, dict[str, Any]] = {}  # spoken user entries, to fill in when transcribed
        # The words of replies under way (item_id -> (audio?, pieces)), kept for when their upstream session is lost
        # before they are done; bounded by MAX_PARTIAL_CHARS per item.
        self._partial: dict[str, tuple[bool, list[str], int]] = {}

    # --- what goes in ------------------------------------------------------------------------------------------

    def on_server_event(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Record what this event says; returns a `relay.usage` event for the client after a `response.done`."""
        kind = event.get("type")
        item_id = event.get("item_id") if isinstance(event.get("item_id"), str) else None  # a key: never a list
        if kind == "conversation.item.added":
            self._user_turn(_dict(event.get("item")))
        elif kind == "conversation.item.input_audio_transcription.completed":
            text = event.get("transcript") if isinstance(event.get("transcript"), str) else ""
            entry = self._users.get(item_id)
            if entry is None:
                self._add({"role": "user", "type": "message", "item_id": item_id, "text": text})
            else:  # its place was kept when the turn began; the transcription may come after the reply
                entry["text"] = text
                self.revision += 1
                if entry not in self._new:
                    self._new.append(entry)
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            self._grow(item_id, event.get("delta"), audio=kind == "response.output_audio_transcript.delta")
        elif kind == "response.output_audio_transcript.done":
            self._partial.pop(item_id, None)
            self._assistant(item_id, event.get("transcript"), audio=True)
        elif kind == "response.output_text.done":
            self._partial.pop(item_id, None)
            self._assistant(item_id, event.get("text"), audio=False)
        elif kind == "response.function_call_arguments.done":
            self._add({"role": "assistant", "type": "function_call", "item_id": item_id,
                       "call_id": event.get("call_id"), "name": event.get("name"),
                       "arguments": event.get("arguments")})
        elif kind == "response.done":
            return self._usage(_dict(event.get("response")))
        return None

    def on_client_event(self, event: dict[str, Any]) -> None:
        """A `conversation.item.create` (the client's, or the relay's for a tool's output): every item a client
        can add, so that a new upstream session can be given them all again (replay_items)."""
        if event.get("type") != "conversation.item.create":
            return
        entry = _entry_of(_dict(event.get("item")))
        if entry is not None:
            self._add(entry)

    def on_upstream_lost(self) -> None:
        """The upstream session ended with replies under way: keep what they had said so far (a new session is
        told it; what the user did not hear is cut later, as for any interrupted reply)."""
        for item_id, (audio, pieces, _) in self._partial.items():
            entry = self._assistant(item_id, "".join(pieces), audio=audio)
            entry["incomplete"] = True
        self._partial.clear()

    def on_truncated(self, item_id: str, audio_end_ms: int, audio_received_ms: int) -> None:
        """The user heard only `audio_end_ms` of the item's audio (the relay's own `relay.item.truncated`)."""
        self._heard[item_id] = (audio_end_ms, audio_received_ms)
        entry = self._by_item.get(item_id)
        if entry is not None:
            self._cut(entry)

    def take_new(self) -> list[dict[str, Any]]:
        new, self._new = self._new, []
        return new

    def snapshot(self) -> dict[str, Any]:
        return {"entries": list(self.entries), "entries_dropped": self.dropped, "usage": self.usage.as_dict()}

    @classmethod
    def resuming(cls, earlier: "History", from_call: str, prices: dict[str, float]) -> "History":
        """A new call's history that begins with an earlier call's conversation (its usage stays with it)."""
        history = cls(prices)
        for entry in earlier.entries:
            if entry.get("type") != "usage":
                history._add({k: v for k, v in entry.items() if k not in ("seq", "resumed_from")}
                             | {"resumed_from": entry.get("resumed_from", from_call)})
        return history

    def replay_items(self, since: int = 0) -> list[dict[str, Any]]:
        """The conversation as Realtime items, to give a new upstream session: text for speech (the way to carry
        a conversation into a new session), the heard part of interrupted replies, tool calls and outputs.
        `since`: only the entries from that seq on (those added after an earlier replay was taken, next_seq then)."""
        return [item for item in map(_item_of, (e for e in self.entries if e["seq"] >= since)) if item is not None]

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], prices: dict[str, float]) -> "History":
        """A history as another worker served it (GET …/transcript): its usage covers entries it no longer holds."""
        history = cls.from_log(snapshot.get("entries") or [], prices)
        usage = _dict(snapshot.get("usage"))
        if isinstance(usage.get("tokens"), dict):
            history.usage.responses = _count(usage.get("responses"))
            history.usage.tokens = {kind: _count(usage["tokens"].get(kind)) for kind in USAGE_FIELDS}
            history.usage.cost_usd = float(usage.get("cost_usd") or 0.0)
        history.dropped = _count(snapshot.get("entries_dropped"))
        return history

    @classmethod
    def from_log(cls, lines: list[dict[str, Any]], prices: dict[str, float]) -> "History":
        """A history read back from its JSON Lines log (an entry logged again after a correction: the later wins)."""
        history = cls(prices)
        by_seq = {line["seq"]: line for line in lines if isinstance(line, dict) and isinstance(line.get("seq"), int)}
        history.entries = [by_seq[seq] for seq in sorted(by_seq)]
        history.next_seq = history.entries[-1]["seq"] + 1 if history.entries else 0
        for entry in history.entries:
            if entry.get("type") == "usage" and isinstance(entry.get("tokens"), dict):
                history.usage.responses += 1
                for kind in USAGE_FIELDS:
                    history.usage.tokens[kind] += _count(entry["tokens"].get(kind))
                history.usage.cost_usd += cost_usd(entry["tokens"], prices)
        return history

    # --- inside ------------------------------------------------------------------------------------------------

    def _add(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"seq": self.next_seq, "at": round(self._clock(), 3), **entry}
        self.next_seq += 1
        self.revision += 1
        self.entries.append(entry)
        self._new.append(entry)
        if len(self.entries) > self.max_entries:
            self._forget_oldest(len(self.entries) - self.max_entries)
        return entry

    def _forget_oldest(self, count: int) -> None:
        """A call that talks for hours keeps its last entries only: memory stays bounded (the log keeps all)."""
        for entry in self.entries[:count]:
            item_id = entry.get("item_id")
            if isinstance(item_id, str):
                for index in (self._by_item, self._users, self._heard):
                    index.pop(item_id, None)
        del self.entries[:count]
        self.dropped += count

    def _user_turn(self, item: dict[str, Any]) -> None:
        """A spoken user turn joins the transcript when it begins, so it stays before the reply to it even when
        its transcription comes after (text added later; empty if the session transcribes nothing)."""
        content = item.get("content") if isinstance(item.get("content"), list) else []
        spoken = any(isinstance(part, dict) and part.get("type") == "input_audio" for part in content)
        if item.get("role") == "user" and spoken and isinstance(item.get("id"), str) and item["id"] not in self._users:
            self._users[item["id"]] = self._add({"role": "user", "type": "message", "item_id": item["id"], "text": ""})

    def _assistant(self, item_id: Any, text: Any, audio: bool) -> dict[str, Any]:
        entry = self._add({"role": "assistant", "type": "message", "item_id": item_id,
                           "text": text if isinstance(text, str) else "", "audio": audio})
        if audio and isinstance(item_id, str):
            self._by_item[item_id] = entry
            if item_id in self._heard:
                self._cut(entry)
        return entry

    def _grow(self, item_id: Any, delta: Any, audio: bool) -> None:
        if not (isinstance(item_id, str) and isinstance(delta, str)):
            return
        _, pieces, size = self._partial.get(item_id) or (audio, [], 0)
        if size + len(delta) <= MAX_PARTIAL_CHARS:
            pieces.append(delta)
            size += len(delta)
        self._partial[item_id] = (audio, pieces, size)

    def _cut(self, entry: dict[str, Any]) -> None:
        """Keep the words the user heard: as many, in proportion, as the audio played of the audio received."""
        heard_ms, received_ms = self._heard[entry["item_id"]]
        full = entry.get("full_text", entry["text"])
        words = full.split()
        keep = len(words) if received_ms <= 0 else round(len(words) * min(1.0, heard_ms / received_ms))
        entry.update(text=" ".join(words[:keep]), full_text=full, heard_ms=heard_ms, interrupted=True)
        self.revision += 1
        if entry not in self._new:
            self._new.append(entry)  # the log gets the corrected entry again (same seq: the later line wins)

    def _usage(self, response: dict[str, Any]) -> dict[str, Any] | None:
        if not isinstance(response.get("usage"), dict):
            return None
        tokens = usage_tokens(response["usage"])
        cost = cost_usd(tokens, self._prices)
        self.usage.responses += 1
        for kind, count in tokens.items():
            self.usage.tokens[kind] += count
        self.usage.cost_usd += cost
        self._add({"role": "relay", "type": "usage", "response_id": response.get("id"), "tokens": tokens,
                   "cost_usd": round(cost, 6)})
        return new_event("relay.usage", response_id=response.get("id"), tokens=tokens, cost_usd=round(cost, 6),
                         total=self.usage.as_dict())


def _entry_of(item: dict[str, Any]) -> dict[str, Any] | None:
    """The transcript entry for an item a client (or the relay, for a tool's output) adds; None for other types."""
    if item.get("type") == "function_call_output":
        return {"role": "tool", "type": "function_call_output", "call_id": item.get("call_id"),
                "output": item.get("output")}
    if item.get("type") == "function_call":
        return {"role": "assistant", "type": "function_call", "item_id": item.get("id"),
                "call_id": item.get("call_id"), "name": item.get("name"), "arguments": item.get("arguments")}
    if item.get("type") == "message" and item.get("role") in ("user", "system", "assistant"):
        parts = item.get("content") if isinstance(item.get("content"), list) else []
        text = " ".join(part.get("text") or part.get("transcript") or "" for part in parts
                        if isinstance(part, dict) and isinstance(part.get("text") or part.get("transcript") or "", str))
        return {"role": item["role"], "type": "message", "item_id": item.get("id"), "text": text}
    return None


def _item_of(entry: dict[str, Any]) -> dict[str, Any] | None:
    """An entry as a Realtime item for a new session (text for speech), or None when it has nothing to give."""
    kind, role, text = entry.get("type"), entry.get("role"), entry.get("text")
    if kind == "message" and role in ("user", "system") and text:
        return {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}
    if kind == "message" and role == "assistant" and text:
        return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
    if kind == "function_call" and isinstance(entry.get("name"), str) and isinstance(entry.get("call_id"), str):
        return {"type": "function_call", "call_id": entry["call_id"], "name": entry["name"],
                "arguments": entry.get("arguments") if isinstance(entry.get("arguments"), str) else "{}"}
    if kind == "function_call_output" and isinstance(entry.get("call_id"), str):
        output = entry.get("output")
        return {"type": "function_call_output", "call_id": entry["call_id"],
                "output": output if isinstance(output, str) else json.dumps(output)}
    return None


def replayable(item: Any) -> bool:
    """Would a replay of the history carry this created item? (Audio or image content has no text to give.)"""
    entry = _entry_of(item) if isinstance(item, dict) else None
    return entry is not None and _item_of(entry) is not None
