"""Upstream faults under live calls and at their start, each with its defined outcome (simulator knobs and raw
servers on loopback). Drops mid-reply, refused keys at reconnect and session expiry: test_reconnect.py; a dead,
refusing, silent or garbage-speaking upstream at call start: test_webrtc_call.py."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from relay.core.history import MAX_PARTIAL_CHARS
from relay.protocol.session import default_session
from relay.server.calls import CALLS, STARTING
from tests.integration.test_webrtc_call import HELLO48, _serve, relay_settings
from tests.webrtc_client import call_relay


@pytest.fixture
async def served(simulator):
    runners = []

    async def serve(upstream_url: str, **settings):
        app, runner, url = await _serve(relay_settings(upstream_url, **settings))
        runners.append(runner)
        return app, url

    yield serve
    for runner in runners:
        await runner.cleanup()


async def _spoken_turn(call, after: int = 0) -> dict:
    call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
    return await call.wait_for("response.done", timeout=30, after=after)


async def test_garbage_and_oversized_upstream_events_are_dropped_or_refused_and_the_call_goes_on(served, simulator):
    app, url = await served(simulator.url + "?model=gpt-realtime&sim_garbage_after_events=1")
    call = await call_relay(url, strict=False)
    try:
        await call.wait_for("session.created")
        # The garbage comes before the simulator's next event, the first of the user's turn.
        first = await _spoken_turn(call)
        # The 2 MB event cannot cross the data channel: the client is told, and the call goes on.
        too_large = await call.wait_for(lambda e: (e.get("error") or {}).get("code") == "event_too_large")
        assert "dropped" in too_large["error"]["message"]
        done = await _spoken_turn(call, after=call.events.index(first) + 1)
        assert done["response"]["status"] == "completed"
        (live,) = app[CALLS].values()
        assert live.upstream.reconnects == 0 and live.close_reason is None
        # Nothing unreadable reached the client: every message it got was a JSON object with a type.
        assert all(isinstance(e, dict) and "type" in e for e in call.events)
        assert sum(size for _, _, size in live.history._partial.values()) <= MAX_PARTIAL_CHARS  # not the 2 MB
    finally:
        await call.close()


async def test_a_five_second_stall_mid_call_delays_the_reply_and_nothing_else(served, simulator):
    app, url = await served(simulator.url + "?model=gpt-realtime&sim_stall_after_events=2&sim_stall_s=5")
    call = await call_relay(url)
    try:
        await call.wait_for("session.created")
        done = await _spoken_turn(call)
        assert done["response"]["status"] == "completed"
        (live,) = app[CALLS].values()
        assert live.upstream.reconnects == 0  # pings were answered all along: not mistaken for a dead link
        assert not any(e["type"].startswith("relay.upstream") for e in call.events)
    finally:
        await call.close()


async def test_an_upstream_that_never_answers_the_handshake_is_a_503_and_leaks_nothing(served):
    accepted: list[asyncio.StreamWriter] = []
    ended = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # the upgrade request, never answered; then the end of the stream when the relay gives up
        ended.set()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        app, url = await served(f"ws://127.0.0.1:{port}/v1/realtime", upstream_timeout_s="1")
        with pytest.raises(AssertionError, match="503.*upstream_timeout"):
            await call_relay(url)
        assert app[CALLS] == {} and app[STARTING] == set()
        await asyncio.wait_for(ended.wait(), 5)  # the relay closed its connection
        assert len(accepted) == 1
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_keeps_pcm_for_a_g711_call_is_a_502_not_noise(served):
    """A service that takes the session.update but not the G.711 format would hear the call's bytes as PCM16."""
    closed = asyncio.Event()

    async def pcm_only(ws) -> None:
        session = default_session("gpt-realtime")
        await ws.send(json.dumps({"type": "session.created", "event_id": "event_1", "session": session}))
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "session.update":  # applied, but for the formats
                changes = {k: v for k, v in event["session"].items() if k != "audio"}
                await ws.send(json.dumps({"type": "session.updated", "event_id": "event_2",
                                          "session": {**session, **changes}}))
        closed.set()

    async with websockets.serve(pcm_only, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        app, url = await served(f"ws://127.0.0.1:{port}/v1/realtime")
        with pytest.raises(AssertionError, match=r"502.*audio/pcmu.*upstream_format_unsupported"):
            await call_relay(url, codecs=["pcmu"])
        assert app[CALLS] == {} and app[STARTING] == set()
        await asyncio.wait_for(closed.wait(), 5)  # the relay closed the session it could not use
