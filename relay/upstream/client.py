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
from relay.core.reconnect import is_fatal
from relay.upstream.target import UpstreamTarget

log = logging.getLogger("relay.upstream")
MAX_EVENT_BYTES = 16 * 1024 * 1024
# A connection that dies silently (no FIN, no RST: a NAT or a link gone) is noticed only by a ping left unanswered:
# within 15 s with these, then the call reconnects. Pongs come from the server's WebSocket layer, so a model that
# is slow to answer is not mistaken for a dead link.
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 10.0


class UpstreamError(Exception):
    """Why the upstream is not usable; `status`, `code` and `message` are safe to show the client. `fatal`: trying
    again will be refused the same way (a bad key, no quota, a refused session), so a reconnect gives up."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, fatal: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.fatal = fatal


async def open_upstream(
    target: UpstreamTarget, session: dict[str, Any] | None, timeout: float, keep_talking: bool = False,
    tools: list[dict[str, Any]] | None = None, replay: list[dict[str, Any]] | None = None,
    from_client: bool = True,
) -> tuple[websockets.ClientConnection, list[str]]:
    """Connect and prepare the session. Returns the socket and the events for the client (JSON text, forwarded
    once its data channel opens): one `session.created` carrying the effective session, as OpenAI's WebRTC
    endpoint sends it when a session was posted with the offer, then anything else that came meanwhile. The
    `session.updated` answers to the relay's own set-up updates stay here: a client must not take them for the
    answer to its own first update.

    `keep_talking`: the operator wants the model to talk through interruptions, so the session's turn detection
    gets `interrupt_response: false` before the call starts (the service's default is true).

    `tools`: the relay's own tools, added to the session's (replacing any of the same name).

    `replay`: conversation items the session starts with (an earlier conversation, as text); the socket is
    returned once the session has taken them all, and the events about them are among the returned ones.

    `from_client`: `session` is what a client posted (a refusal is its fault: 400); else it is the relay's own
    replay of an earlier session's configuration (a refusal is the upstream's: 502, fatal only for fatal codes)."""
    assert target.url is not None
    try:
        ws = await asyncio.wait_for(
            websockets.connect(
                target.url,
                additional_headers=target.headers,
                max_size=MAX_EVENT_BYTES,
                compression=None,  # deflate costs CPU on every audio event and buys little on base64
                open_timeout=None,  # bounded by wait_for
                ping_interval=PING_INTERVAL_S,
                ping_timeout=PING_TIMEOUT_S,
            ),
            timeout,
        )
    except asyncio.TimeoutError:
        raise UpstreamError(503, "upstream_timeout", "The model service did not answer in time.") from None
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        log.warning("upstream connection refused: HTTP %s", status)
        raise UpstreamError(502, "upstream_unavailable", "The model service cannot be reached.",
                            fatal=status in (401, 403, 404)) from None
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        log.warning("upstream connection failed: %s", type(exc).__name__)
        raise UpstreamError(502, "upstream_unavailable", "The model service cannot be reached.") from None
    try:
        others: list[str] = []
        created = await _expect(ws, "session.created", others, timeout)
        effective = created.get("session") if isinstance(created.get("session"), dict) else {}
        if session is not None:
            await ws.send(json.dumps({"type": "session.update", "event_id": "relay_initial_session", "session": session}))
            effective = (await _expect(ws, "session.updated", others, timeout, client_input=from_client)
                         ).get("session") or effective
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
        if replay:
            await _replay(ws, replay, others, timeout)
        return ws, [json.dumps({**created, "session": effective}), *others]
    except websockets.ConnectionClosed as exc:  # while sending; a close while reading is mapped by _expect
        await ws.close()
        raise _closed(exc) from None
    except BaseException:
        await ws.close()
        raise


async def _replay(ws: websockets.ClientConnection, items: list[dict[str, Any]], others: list[str],
                  timeout: float) -> None:
    """Give the session the items, and return once it has dealt with them all: an empty `session.update` after
    them is answered only once every event before it has been (the service works through a session's events in
    order), so every item's `conversation.item.added`/`.done` is in `others` by then. An item it refuses is logged
    and left out: the rest of the conversation is still worth having."""
    ids = [f"relay_replay_{n}" for n in range(len(items))]
    for event_id, item in zip(ids, items):
        await ws.send(json.dumps({"type": "conversation.item.create", "event_id": event_id, "item": item}))
    await ws.send(json.dumps({"type": "session.update", "event_id": "relay_replay_end", "session": {"type": "realtime"}}))
    while (event := await _expect(ws, ("session.updated", "error"), others, timeout))["type"] == "error":
        if not (isinstance(event.get("error"), dict) and event["error"].get("event_id") in ids):
            raise _refused(event)
        log.warning("upstream refused a replayed item: %s", event["error"].get("code"))


async def _expect(ws: websockets.ClientConnection, wanted: str | tuple[str, ...], others: list[str], timeout: float,
                  client_input: bool = False) -> dict[str, Any]:
    """Read until an event of the `wanted` type(s) and return it; other events are kept in `others`. An `error`
    first (unless wanted) is the client's fault (400) when it answers the client's own session, the relay's
    configuration otherwise (502)."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    try:
        async with asyncio.timeout(timeout):
            while True:
                text = await ws.recv()
                event = json.loads(text)
                if not isinstance(event, dict):
                    raise ValueError("an event that is not a JSON object")
                if event.get("type") in wanted:
                    return event
                if event.get("type") != "error":
                    others.append(text)
                elif client_input:
                    error = event["error"] if isinstance(event.get("error"), dict) else {}
                    raise UpstreamError(400, str(error.get("code") or "invalid_session"),
                                        str(error.get("message") or "The session was refused."), error.get("param"),
                                        fatal=True)
                else:
                    raise _refused(event)
    except asyncio.TimeoutError:
        raise UpstreamError(503, "upstream_timeout", "The model service did not answer in time.") from None
    except websockets.ConnectionClosed as exc:
        raise _closed(exc) from None
    except (ValueError, RecursionError):
        raise UpstreamError(502, "upstream_protocol_error", "The model service sent something unreadable.") from None


def _closed(exc: websockets.ConnectionClosed) -> UpstreamError:
    return UpstreamError(502, "upstream_closed", "The model service closed the connection.",
                         fatal=is_fatal(exc.rcvd.code if exc.rcvd else None, None))


def _refused(error_event: dict[str, Any]) -> UpstreamError:
    """The relay's own set-up was refused (its key, its model, its configuration): the service's code is kept,
    its message is not (it may quote part of the key)."""
    error = error_event["error"] if isinstance(error_event.get("error"), dict) else {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    log.warning("upstream refused the connection: %s", code)
    return UpstreamError(502, "upstream_refused", f"The model service refused the relay's connection ({code}).",
                         fatal=is_fatal(None, code))
