"""The upstream link: the call's side towards the model, one Realtime session at a time over a WebSocket.

Owns: the socket of the current session; the outbox (what waits for the writer) with its byte budget (the client's
audio and events must fit, the relay's own control events always go); the writer and the reader tasks; reading
each event (JSON, a type) and telling apart audio deltas, errors and the rest; replacing a session that ends under
the call (reconnect, with backoff) or that is about to expire (rollover, at a quiet moment); the switch-over to a
new session (what of the outbox it still gets); and its counts (bytes, reconnects, rollovers, dropped audio).
The decisions (fatal or not, the backoff, when to roll over, what a new session still gets) are
relay/core/reconnect.py's; this module carries them out.
Must not touch: the peer, the records, what an event means to the call (it hands events to its owner, the Call,
through the UpstreamOwner methods), or the core's state (it reads the session and quietness, asks for own events).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable, Protocol

import websockets

from relay.config import Settings
from relay.core.call import CallCore, error_event, new_event
from relay.core.history import History
from relay.core.reconnect import backoff_delays, is_fatal, rollover_at, session_to_replay, still_to_send
from relay.upstream.client import UpstreamError, open_upstream
from relay.upstream.target import UpstreamTarget

log = logging.getLogger("relay.call")

MAX_UPSTREAM_BACKLOG_BYTES = 4 * 1024 * 1024  # waiting for the upstream; beyond it audio is dropped, events refused
# The user's last 500 ms of audio go to a rollover's new session first: a word begun just before the switch (before
# the old session's VAD reported it) is heard whole by the new one.
RECENT_AUDIO_CHUNKS = 25
ROLLOVER_RETRY_S = 2.0  # a rollover that found the conversation moving on tries again this much later
ROLLOVER_SETTLE_S = 1.0  # the old session's answer to the last event sent to it has had time to come back
_AUDIO_PREFIX = '{"type":"input_audio_buffer.append"'


class UpstreamOwner(Protocol):
    """What the upstream link needs of its call."""

    core: CallCore  # read: the effective session, the relay's tools, quietness; own_event for replayed items
    history: History  # read: the conversation a new session is given

    def on_audio_delta(self, event: dict[str, Any]) -> None: ...
    def on_server_event(self, event: dict[str, Any], text: str) -> None: ...  # any other event (a dict with a type)
    def session_lost(self) -> None: ...  # the session died under the call: the reply under way ends
    def tell(self, event: dict[str, Any]) -> None: ...  # an event for the call's clients
    def quiet(self) -> bool: ...  # nobody talking and nothing running: a moment to change sessions
    def close_soon(self, reason: str) -> None: ...


class UpstreamLink:
    def __init__(self, call_id: str, settings: Settings, target: UpstreamTarget, owner: UpstreamOwner,
                 spawn: Callable[[Awaitable[None], str], None]) -> None:
        self.call_id = call_id
        self.settings = settings
        self.target = target
        self._owner = owner
        self._spawn = spawn
        self.ws: websockets.ClientConnection | None = None
        self.outbox: deque[str] = deque()
        self.outbox_bytes = 0
        self._ready = asyncio.Event()  # something is in the outbox
        self._live = asyncio.Event()  # a session is connected: the writer may send
        self.reconnecting = False  # a session was lost and its replacement is not there yet: audio is dropped
        self._recent_audio: deque[str] = deque(maxlen=RECENT_AUDIO_CHUNKS)  # given to a rollover's new session
        self._last_error: str | None = None  # the code, when the upstream's last event was an error
        self._fatal_error: str | None = None  # a fatal code the upstream sent (a refused key): no reconnect
        self._switched = asyncio.Event()  # a new session replaced the one being read
        self._events_sent = 0  # events other than audio written upstream, and when the last one was
        self._event_sent_at = 0.0
        self._opened_at = 0.0  # wall clock, like expires_at
        self.expires_at: Any = None  # the session's, from its session.created
        self.reconnects = self.rollovers = self.dropped_audio_chunks = 0
        self.bytes_in = self.bytes_out = 0  # JSON text of the upstream's events and ours

    # --- opening and adopting a session ------------------------------------------------------------------------

    async def open(self, session: dict[str, Any] | None, replay: list[dict[str, Any]],
                   from_client: bool = False) -> tuple[websockets.ClientConnection, list[str]]:
        core = self._owner.core
        ws, events = await open_upstream(
            self.target, core.upstream_session(session), self.settings.upstream_timeout_s,
            keep_talking=not self.settings.interruptions, tools=core.server_tools, replay=replay,
            from_client=from_client,
        )
        mismatch = core.format_mismatch(json.loads(events[0]).get("session"))
        if mismatch is not None:  # it would hear the call's audio as another format, and play noise
            await ws.close()
            raise UpstreamError(502, "upstream_format_unsupported", mismatch, fatal=True)
        return ws, events

    async def _open_next(self) -> tuple[websockets.ClientConnection, list[str], int, int]:
        """A session to take over from the current one, given its configuration and the conversation so far:
        (socket, its first events, history entries it has had, items replayed)."""
        history = self._owner.history
        said, replay = history.next_seq, history.replay_items()
        ws, events = await self.open(session_to_replay(self._owner.core.session), replay)
        return ws, events, said, len(replay)

    def adopt(self, ws: websockets.ClientConnection, events: list[str], first: bool = False) -> None:
        """Make `ws` the call's upstream session. `events` are its first (session.created with the effective
        session, then what its set-up caused): the client gets them for the call's first session only; for a
        later one it has had them already, and the conversation it knows is the same."""
        self.ws = ws
        self._last_error = self._fatal_error = None
        created = json.loads(events[0])  # open_upstream's own serialisation of session.created
        session = created.get("session") if isinstance(created.get("session"), dict) else {}
        self._opened_at, self.expires_at = time.time(), session.get("expires_at")
        if first:
            for text in events:
                self.on_text(text)  # through the core, which learns the session from them
        else:
            self._owner.core.follow_session(session)
        self._live.set()

    def start(self) -> None:
        """The session's tasks, owned by the call: reading, writing, rolling over."""
        self._spawn(self._keep_reading(), "upstream-reader")
        self._spawn(self._write(), "upstream-writer")
        self._spawn(self._roll_over(), "rollover")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    # --- to the upstream ---------------------------------------------------------------------------------------

    def send_audio(self, audio: bytes) -> None:
        """~20 ms of the client's audio (the hot path: the budget check of send() is inlined)."""
        text = '{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(audio).decode() + '"}'
        self._recent_audio.append(text)
        if self.reconnecting or self.outbox_bytes + len(text) > MAX_UPSTREAM_BACKLOG_BYTES:
            self.dropped_audio_chunks += 1
            return
        self.outbox.append(text)
        self.outbox_bytes += len(text)
        self._ready.set()

    def send(self, text: str, budgeted: bool = True) -> bool:
        """Queue for the writer. The client's events must fit the byte budget (False: refused); the relay's own
        control events (cancel, truncate) always go."""
        if budgeted and self.outbox_bytes + len(text) > MAX_UPSTREAM_BACKLOG_BYTES:
            return False
        self.outbox.append(text)
        self.outbox_bytes += len(text)
        self._ready.set()
        return True

    async def _write(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self.outbox:
                if not self._live.is_set():
                    await self._live.wait()
                    continue  # a new session: the outbox has been sorted out for it (maybe emptied)
                ws = self.ws
                text = self.outbox.popleft()
                self.outbox_bytes -= len(text)
                if not text.startswith(_AUDIO_PREFIX):
                    self._events_sent += 1
                    self._event_sent_at = time.monotonic()
                try:
                    await ws.send(text)
                    self.bytes_out += len(text)
                except websockets.ConnectionClosed:
                    if ws is self.ws:  # lost: the reader replaces the session, then decides what is still sent
                        self._live.clear()
                        self.outbox.appendleft(text)
                        self.outbox_bytes += len(text)

    # --- from the upstream -------------------------------------------------------------------------------------

    async def _keep_reading(self) -> None:
        """Read the upstream session; when it ends under the call, replace it, or end the call."""
        while True:
            ws = self.ws
            assert ws is not None
            self._switched.clear()
            # Replaced (a rollover), the old session is dropped at once, not after its close handshake.
            reader, switched = asyncio.ensure_future(self._read(ws)), asyncio.ensure_future(self._switched.wait())
            try:
                await asyncio.wait({reader, switched}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reader, switched):
                    task.cancel()
                await asyncio.gather(reader, switched, return_exceptions=True)
            if ws is self.ws and not await self._reconnect(ws):
                return

    async def _read(self, ws: websockets.ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosedError):
            async for text in ws:
                self.bytes_in += len(text)
                if ws is not self.ws:
                    return  # replaced: the rest of the old session's events are not wanted
                if isinstance(text, str):
                    try:
                        self.on_text(text)
                    except Exception:  # a bug met by one odd event costs that event, not the session
                        log.exception("call %s: failed on an upstream event; dropped", self.call_id,
                                      extra={"call_id": self.call_id})

    def on_text(self, text: str) -> None:
        """One event of the session: audio deltas and the rest to the owner; errors noted (fatal? expired?)."""
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            log.warning("call %s: unreadable upstream event dropped", self.call_id, extra={"call_id": self.call_id})
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            # Clients dispatch on the type: an event without one would be garbage to them too.
            log.warning("call %s: upstream event without a type dropped", self.call_id, extra={"call_id": self.call_id})
            return
        kind = event["type"]
        if kind == "response.output_audio.delta":
            self._owner.on_audio_delta(event)
            return
        self._last_error = _error_code(event) if kind == "error" else None
        if self._last_error is not None and is_fatal(None, self._last_error):
            self._fatal_error = self._last_error
        if self._last_error == "session_expired" and self.settings.upstream_retries and self.ws is not None:
            self._spawn(self.ws.close(), "expired-upstream-close")  # do not wait for the service to close it
            return  # the relay opens a new session: for the client, the conversation goes on
        self._owner.on_server_event(event, text)

    # --- replacing a session -----------------------------------------------------------------------------------

    async def _reconnect(self, lost: websockets.ClientConnection) -> bool:
        """The session `lost` ended: open a new one with the session configuration and the conversation, trying
        again with backoff; False when there is no point (a refused key) or the retries are spent, and the call is
        ending."""
        expired = self._last_error == "session_expired"
        if is_fatal(lost.close_code, self._fatal_error) or self.settings.upstream_retries == 0:
            detail = self._fatal_error or self._last_error or f"close code {lost.close_code}"
            self._give_up("upstream_closed", f"The connection to the model service ended ({detail}).")
            return False
        reason = "session_expired" if expired else f"connection closed ({lost.close_code})"
        log.info("call %s: upstream session lost (%s), reconnecting", self.call_id, reason,
                 extra={"call_id": self.call_id, "event": "upstream_reconnecting", "reason": reason})
        self._live.clear()
        self.reconnecting = True
        self._owner.tell(new_event("relay.upstream.reconnecting", reason=reason))
        self._owner.session_lost()
        for attempt, delay in enumerate(backoff_delays(self.settings.upstream_retries,
                                                       self.settings.upstream_retry_backoff_s), start=1):
            await asyncio.sleep(delay)
            try:
                ws, events, said, replayed = await self._open_next()
            except UpstreamError as exc:
                log.warning("call %s: reconnect attempt %d failed: %s", self.call_id, attempt, exc.code,
                            extra={"call_id": self.call_id})
                if exc.fatal:
                    self._give_up(exc.code, exc.message)
                    return False
                continue
            self._switch_to(ws, events, recent_audio=False, since=said)
            self.reconnecting = False
            self.reconnects += 1
            log.info("call %s: upstream reconnected (attempt %d, %d items replayed)", self.call_id, attempt, replayed,
                     extra={"call_id": self.call_id, "event": "upstream_reconnected", "attempt": attempt,
                            "replayed_items": replayed})
            self._owner.tell(new_event("relay.upstream.reconnected", attempt=attempt, replayed_items=replayed,
                                       expires_at=self.expires_at))
            return True
        self._give_up("upstream_unavailable", "The connection to the model service was lost and could not be made "
                      f"again ({self.settings.upstream_retries} attempts).")
        return False

    def _give_up(self, code: str, message: str) -> None:
        """The upstream is gone for good: the client is told why, and the call ends."""
        log.warning("call %s: upstream gone: %s", self.call_id, message, extra={"call_id": self.call_id})
        self._owner.tell(error_event(code, message, "server_error"))
        self._owner.close_soon("upstream lost")

    def _switch_to(self, ws: websockets.ClientConnection, events: list[str], recent_audio: bool, since: int) -> None:
        """Send from now on to the new session `ws`, which has had the history's entries before `since`. Then
        it gets: the entries added while it was opened (a tool's output, a client's message), for a rollover the
        user's last half second, and what was still waiting for the old session if it still means something
        (see still_to_send)."""
        old = self.ws
        core = self._owner.core
        added = [json.dumps(core.own_event("conversation.item.create", item=item), separators=(",", ":"))
                 for item in self._owner.history.replay_items(since)]
        pending = added + (list(self._recent_audio) if recent_audio else []) + still_to_send(self.outbox)
        self.outbox = deque(pending)
        self.outbox_bytes = sum(map(len, pending))
        self.adopt(ws, events)
        self._ready.set()
        self._switched.set()
        if old is not None and old is not ws:
            self._spawn(old.close(), "old-upstream-close")

    async def _roll_over(self) -> None:
        """Replace the session before the service ends it (rollover_before_s ahead of its expires_at), at a moment
        when nobody speaks, so that a long call never meets the limit. The new session is made ready beside the
        old one; the switch itself is instant and the outbound audio never pauses."""
        history = self._owner.history
        while True:
            old = self.ws
            due = rollover_at(self._opened_at, self.expires_at, self.settings.rollover_before_s)
            if due is None:
                return
            if time.time() < due:  # the session may change meanwhile (a reconnect): look again at least each minute
                await asyncio.sleep(min(60.0, due - time.time()))
                continue
            while not self._quiet():
                await asyncio.sleep(0.1)
            if self.ws is not old:
                continue  # replaced meanwhile (it expired and was reconnected): a new session, a new due time
            revision, sent = history.revision, self._events_sent
            try:
                ws, events, said, replayed = await self._open_next()
            except UpstreamError as exc:
                log.warning("call %s: rollover failed: %s", self.call_id, exc.code, extra={"call_id": self.call_id})
                if exc.fatal:
                    return  # a refused key: the session ends at its expiry, and the call with it
                await asyncio.sleep(ROLLOVER_RETRY_S)
                continue
            # Switch only if the old session has had nothing since the replay was taken (no correction of the
            # history, no event a client or the relay sent: a session.update, a response.create whose answer is
            # still on its way) and nothing sent to it lately either.
            unchanged = history.revision == revision and self._events_sent == sent
            settled = time.monotonic() - self._event_sent_at > ROLLOVER_SETTLE_S
            if self.ws is old and self._quiet() and unchanged and settled:
                self._switch_to(ws, events, recent_audio=True, since=said)
                self.rollovers += 1
                log.info("call %s: upstream session rolled over (%d items replayed)", self.call_id, replayed,
                         extra={"call_id": self.call_id, "event": "upstream_rolled_over", "replayed_items": replayed})
                self._owner.tell(new_event("relay.upstream.rolled_over", replayed_items=replayed,
                                           expires_at=self.expires_at))
            else:  # the conversation moved on while the new session was prepared: its replay is out of date
                await ws.close()
                await asyncio.sleep(ROLLOVER_RETRY_S)

    def _quiet(self) -> bool:
        return not self.reconnecting and self._owner.quiet()


def _error_code(event: dict[str, Any]) -> str | None:
    error = event.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
