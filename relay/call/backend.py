"""One backend attached to a call over its control socket (`GET /v1/realtime?call_id=…`, OpenAI's "sideband").

Owns: the backend's WebSocket once it is open (the route in relay/server/control.py made it): the events it is told
(a `told` listener of the call's Fanout: every event the data channel gets, in the same order, from the moment it
attached) through a bounded queue and a writer task, its messages in (text, within RELAY_MAX_MESSAGE_BYTES, then
handed to `on_text`: the call treats them as a trusted client's), its errors back to it alone, its close (with a
code and a reason), and its byte and event counts (`Traffic`, shared by the call's backends).
Must not touch: what an event means (the call and its core decide), the call's other connections. It never delays
the call: `told` only appends; a backend that does not keep up (more than `queue_bytes` waiting) is closed with
1008 and a reason, the call goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import Any, Callable, Protocol

from relay.call import meter
from relay.core.call import error_event

log = logging.getLogger("relay.call")

CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_GOING_AWAY = 1000, 1008, 1009, 1001
CLOSE_TIMEOUT_S = 2.0  # how long a close may take before the socket is left to close on its own
ABORT_AFTER_S = 10.0  # then how long before the connection is dropped


class Socket(Protocol):
    """What the link needs of a WebSocket (aiohttp's WebSocketResponse has it)."""

    async def send_str(self, data: str) -> None: ...
    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


class Traffic:
    """A call's backend traffic so far, in plain ints (flushed to the metrics with the call's other counts)."""

    __slots__ = ("events_in", "events_out", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.events_in = self.events_out = self.bytes_in = self.bytes_out = 0


class BackendLink:
    def __init__(self, call_id: str, ws: Socket, abort: Callable[[], None], on_text: Callable[[str, Any], None],
                 queue_bytes: int, max_message_bytes: int, traffic: Traffic) -> None:
        self.call_id = call_id
        self._ws, self._abort, self._on_text = ws, abort, on_text
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._queue_bytes, self._max_message_bytes = queue_bytes, max_message_bytes
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing: asyncio.Task | None = None
        self.traffic = traffic
        self.close_reason: str | None = None

    # --- out: the call's events, never waited for -----------------------------------------------------------------

    def told(self, event: dict[str, Any], text: str) -> None:
        """An event of the call (Fanout): queued for the writer; over the bound the backend is closed."""
        if self.close_reason is not None:
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        self._wake.set()
        if self._queued_bytes > self._queue_bytes:
            self.end(CLOSE_POLICY, f"backend too slow: more than {self._queue_bytes} bytes of events waiting "
                     "(RELAY_BACKEND_QUEUE_BYTES)")

    def reply(self, event: dict[str, Any]) -> None:
        """An event for this backend alone (an error its own event caused)."""
        self.told(event, json.dumps(event, separators=(",", ":")))

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                text = self._queue.popleft()
                self._queued_bytes -= len(text)
                await self._ws.send_str(text)
                self.traffic.events_out += 1
                self.traffic.bytes_out += len(text)

    # --- in: its events --------------------------------------------------------------------------------------------

    def on_message(self, text: Any) -> None:
        """One message from the backend: text within the size limit goes to the call, else an error back."""
        self.traffic.events_in += 1
        self.traffic.bytes_in += len(text)
        if not isinstance(text, str):
            self.reply(error_event("invalid_event", "Binary messages are not supported: send events as JSON text."))
        elif len(text.encode("utf-8", "surrogatepass")) > self._max_message_bytes:
            self.reply(error_event("message_too_large", f"Messages are limited to {self._max_message_bytes} bytes "
                                   "(RELAY_MAX_MESSAGE_BYTES)."))
        else:
            self._on_text(text, self)

    # --- lifetime --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._writer = asyncio.ensure_future(self._write())
        self._writer.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.end(CLOSE_GOING_AWAY, "connection lost")

    def end(self, code: int, reason: str, flush: bool = False) -> None:
        """Close the backend's socket (from anywhere, any number of times). `flush`: what is queued goes first
        (CLOSE_TIMEOUT_S at most; the call's last events), else it is dropped."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if not flush:
            self._queue.clear()
        self._closing = asyncio.ensure_future(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), CLOSE_TIMEOUT_S)
        if self._writer is not None:
            self._writer.cancel()
        try:
            await asyncio.wait_for(self._ws.close(code=code, message=reason.encode()[:123]), CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            # The socket closes once what it holds (the close frame last) is read; a backend that never reads it
            # is cut off after ABORT_AFTER_S.
            asyncio.get_running_loop().call_later(ABORT_AFTER_S, self._abort)

    async def _drained(self) -> None:
        while self._queue and self._writer is not None and not self._writer.done():
            await asyncio.sleep(0.005)

    async def closed(self) -> None:
        """Wait for the writer and the close to be over (the route's `finally`)."""
        if self.close_reason is None:
            self.end(CLOSE_GOING_AWAY, "backend disconnected")
        for task in (self._writer, self._closing):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task


class Backends:
    """A call's attached backends: at most `limit`, each a `told` listener of the call's events from its attach."""

    def __init__(self, call_id: str, events: Any, limit: int) -> None:
        self.call_id, self._events, self.limit = call_id, events, limit
        self.links: list[BackendLink] = []
        self.traffic = Traffic()

    def full(self) -> bool:
        return len(self.links) >= self.limit

    def attach(self, link: BackendLink) -> None:
        self.links.append(link)
        self._events.listen(link)
        link.start()
        meter.backend_attached()
        log.info("call %s: backend attached (%d)", self.call_id, len(self.links), extra={
            "call_id": self.call_id, "event": "backend_attached", "backends": len(self.links)})

    def detach(self, link: BackendLink) -> None:
        if link not in self.links:
            return
        self.links.remove(link)
        self._events.forget(link)
        meter.backend_detached()
        log.info("call %s: backend detached: %s", self.call_id, link.close_reason, extra={
            "call_id": self.call_id, "event": "backend_detached", "reason": link.close_reason,
            "backends": len(self.links)})

    def end_all(self, reason: str) -> None:
        """The call ended: every backend gets the events queued for it, then its close with the reason."""
        for link in self.links:
            link.end(CLOSE_NORMAL, f"call ended: {reason}", flush=True)
