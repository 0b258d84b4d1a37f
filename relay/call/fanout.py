"""The call's events, from one place to whoever listens.

Owns: the lists of listeners and the order they hear things in (the order they were added). A listener is any object
with one or more of these methods (the others are simply not called):
- `told(event, text)`: an event for the call's clients, as dict and as the JSON text that goes out: the upstream's
  events the core forwards (as received), and the relay's own (`output_audio_buffer.*`, `relay.*`, errors).
  Today: the call's records (truncations cut the transcript), then the peer link's data channel, then the
  backends attached over the control socket (relay/call/backend.py), each from the moment it attached.
- `heard(event)`: every event of the upstream session but audio deltas, once the core has taken it and its actions
  are carried out. Today: the records (transcript, usage).
- `added(event)`: a `conversation.item.create` on its way upstream (a client's, or the relay's for a tool's
  output). Today: the records (a new session is given every item again).
Adding a listener is one line: `call.events.listen(listener)`.

Must not touch: the audio path (20 ms frames go by direct calls, never through here), or what an event means: it
only delivers. A listener must not raise (the caller's guard would count it against the event).
"""

from __future__ import annotations

import json
from typing import Any, Callable

STREAMS = ("told", "heard", "added")


class Fanout:
    __slots__ = ("_told", "_heard", "_added")

    def __init__(self) -> None:
        self._told: list[Callable[[dict[str, Any], str], None]] = []
        self._heard: list[Callable[[dict[str, Any]], None]] = []
        self._added: list[Callable[[dict[str, Any]], None]] = []

    def listen(self, listener: object) -> None:
        """From now on `listener` gets the streams it has a method for."""
        found = [stream for stream in STREAMS if callable(getattr(listener, stream, None))]
        if not found:
            raise TypeError(f"{type(listener).__name__} listens to none of {', '.join(STREAMS)}")
        for stream in found:
            getattr(self, f"_{stream}").append(getattr(listener, stream))

    def forget(self, listener: object) -> None:
        """From now on `listener` gets nothing (it was added with listen)."""
        for stream in STREAMS:
            method = getattr(listener, stream, None)
            if callable(method) and method in getattr(self, f"_{stream}"):
                getattr(self, f"_{stream}").remove(method)

    def tell(self, event: dict[str, Any], text: str | None = None) -> None:
        """An event for the call's clients; `text`: as received (not serialised again), else made here."""
        if text is None:
            text = json.dumps(event, separators=(",", ":"))
        for told in self._told:
            told(event, text)

    def heard(self, event: dict[str, Any]) -> None:
        for heard in self._heard:
            heard(event)

    def added(self, event: dict[str, Any]) -> None:
        for added in self._added:
            added(event)
