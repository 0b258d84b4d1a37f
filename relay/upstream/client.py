"""Opening the WebSocket to the upstream Realtime endpoint, ready for a call.

A call is answered only once the upstream is really there: connected, `session.created` received, and, when the
client posted a session configuration, `session.updated` for it. Anything else becomes an UpstreamError carrying
the HTTP status the signaling answer should use, so a dead or misconfigured upstream is reported at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import websockets

from relay.core.call import with_tools
from relay.upstream.target import UpstreamTarget

log = logging.getLogger("relay.upstream")
MAX_EVENT_BYTES = 16 * 1024 * 1024


class UpstreamError(Exception):
    """Why the upstream is not usable; `status`, `code` and `message` are safe to show the client."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


async def open_upstream(
    target: UpstreamTarget, session: dict[str, Any] | None, timeout: float, keep_talking: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[websockets.ClientConnection, list[str]]:
    """Connect and prepare the session. Returns the socket and the events for the client (JSON text, forwarded
    once its data channel opens): one `session.created` carrying the effective session, as OpenAI's WebRTC
    endpoint sends it when a session was posted with the offer, then anything else that came meanwhile. The
    `session.updated` answers to the relay's own set-up updates stay here: a client must not take them for the
    answer to its own first update.

    `keep_talking`: the operator wants the model to talk through interruptions, so the session's turn detection
    gets `interrupt_response: false` before the call starts (the service's default is true).

    `tools`: the relay's own tools, added to the session's (replacing any of the same name)."""
    assert target.url is not None
    try:
        ws = await asyncio.wait_for(
            websockets.connect(
                target.url,
                additional_headers=target.headers,
                max_size=MAX_EVENT_BYTES,
                compression=None,  # deflate costs CPU on every audio event and buys little on base64
                open_timeout=None,  # bounded by wait_for
                ping_interval=20,
                ping_timeout=20,
            ),
            timeout,
        )
    except asyncio.TimeoutError:
        raise UpstreamError(503, "upstream_timeout", "The model service did not answer in time.") from None
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        log.warning("upstream connection failed: %s", type(exc).__name__)
        raise UpstreamError(502, "upstream_unavailable", "The model service cannot be reached.") from None
    try:
        others: list[str] = []
        created = await _expect(ws, "session.created", others, timeout)
        effective = created.get("session") if isinstance(created.get("session"), dict) else {}
        if session is not None:
            await ws.send(json.dumps({"type": "session.update", "event_id": "relay_initial_session", "session": session}))
            effective = (await _expect(ws, "session.updated", others, timeout, client_input=True)).get("session") or effective
        audio_in = (effective.get("audio") or {}).get("input") or {}
        turn_detection = audio_in.get("turn_detection") if isinstance(audio_in, dict) else None
        if keep_talking and isinstance(turn_detection, dict) and turn_detection.get("interrupt_response") is not False:
            update = {"type": "realtime", "audio": {"input": {"turn_detection": {**turn_detection, "interrupt_response": False}}}}
            await ws.send(json.dumps({"type": "session.update", "event_id": "relay_keep_talking", "session": update}))
            effective = (await _expect(ws, "session.updated", others, timeout)).get("session") or effective
        if tools:
            update = {"type": "realtime", "tools": with_tools(effective.get("tools"), tools)}
            await ws.send(json.dumps({"type": "session.update", "event_id": "relay_tools", "session": update}))
            effective = (await _expect(ws, "session.updated", others, timeout)).get("session") or effective
        return ws, [json.dumps({**created, "session": effective}), *others]
    except BaseException:
        await ws.close()
        raise


async def _expect(ws: websockets.ClientConnection, wanted: str, others: list[str], timeout: float,
                  client_input: bool = False) -> dict[str, Any]:
    """Read until `wanted` and return it; other events are kept in `others`. An `error` first is the client's
    fault (400) when it answers the client's own session, the relay's configuration otherwise (502)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                text = await ws.recv()
                event = json.loads(text)
                if not isinstance(event, dict):
                    raise ValueError("an event that is not a JSON object")
                if event.get("type") == wanted:
                    return event
                if event.get("type") != "error":
                    others.append(text)
                if event.get("type") == "error":
                    error = event["error"] if isinstance(event.get("error"), dict) else {}
                    if client_input:
                        raise UpstreamError(400, str(error.get("code") or "invalid_session"),
                                            str(error.get("message") or "The session was refused."), error.get("param"))
                    log.warning("upstream refused the connection: %s", error.get("code"))
                    raise UpstreamError(502, "upstream_refused",
                                        "The model service refused the relay's connection.")
    except asyncio.TimeoutError:
        raise UpstreamError(503, "upstream_timeout", "The model service did not answer in time.") from None
    except websockets.ConnectionClosed:
        raise UpstreamError(502, "upstream_closed", "The model service closed the connection.") from None
    except (ValueError, RecursionError):
        raise UpstreamError(502, "upstream_protocol_error", "The model service sent something unreadable.") from None
