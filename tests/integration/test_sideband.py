"""The backend's control socket (`GET /v1/realtime?call_id=…`, OpenAI's "sideband"), with the official `openai` SDK's
`client.realtime.connect(call_id=…)` against `relay serve` on the simulator while an aiortc peer speaks: what the
backend sees, what it changes, a function call it answers, its close when the call ends; the refusals; a backend
that does not read; two workers."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest
import websockets

from tests.audio_checks import loud_ms
from tests.integration.test_openai_sdk import HELLO48, KEY, offer_through, sdk
from tests.processes import clean_env, relay_logged
from tests.webrtc_client import ClientCall, call_relay

TOOL = {"type": "function", "name": "lookup_order", "description": "Where an order is.",
        "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}
INSTRUCTIONS = "The backend's instructions."


def relay_env(simulator, **extra: str) -> dict[str, str]:
    return clean_env(RELAY_UPSTREAM_URL=simulator.url + "?model=gpt-realtime", RELAY_ICE_ADDRESSES="127.0.0.1",
                     RELAY_API_KEYS=KEY, RELAY_CALLS_PER_IP_PER_S="1000", RELAY_CALL_IDLE_TIMEOUT_S="5", **extra)


@pytest.fixture
async def single(simulator) -> AsyncIterator[Any]:
    env = relay_env(simulator, RELAY_MAX_BACKENDS_PER_CALL="1", RELAY_BACKEND_QUEUE_BYTES="65536")
    async with relay_logged(env=env) as relay:
        yield relay


class Backend:
    """A backend attached with the SDK; every event it gets, raw (the order is what is checked), and when."""

    def __init__(self, connection: Any) -> None:
        self.connection, self.events, self.times = connection, [], []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                self.events.append(json.loads(await self.connection.recv_bytes()))
                self.times.append(time.monotonic())
        except websockets.ConnectionClosed:
            pass

    def first(self, kind: str) -> float | None:
        """When the first event of that type came (monotonic), if one did."""
        return next((t for e, t in zip(self.events, self.times) if e["type"] == kind), None)

    async def wait_for(self, test: Any, timeout: float = 20.0) -> dict[str, Any]:
        check = (lambda e: e["type"] == test) if isinstance(test, str) else test
        async with asyncio.timeout(timeout):
            while not any(check(e) for e in self.events):
                await asyncio.sleep(0.02)
        return next(e for e in self.events if check(e))

    async def closed(self, timeout: float = 20.0) -> tuple[int | None, str]:
        await asyncio.wait_for(self.reader, timeout)
        ws = self.connection._connection
        return ws.close_code, ws.close_reason


async def a_call(base: str) -> ClientCall:
    async with sdk(base, KEY) as app:
        call = await call_relay(base, post=offer_through(app))
    await call.wait_for("session.created")
    return call


def user_says(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


async def test_a_backend_sees_the_call_changes_it_answers_its_tool_and_is_closed_at_hangup(single):
    call = await a_call(single.base)
    try:
        async with sdk(single.base, KEY) as client, client.realtime.connect(call_id=call.call_id) as connection:
            backend = Backend(connection)
            attached_at = len(call.events)
            await connection.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS,
                                                     "tools": [TOOL]})
            updated = await call.wait_for(lambda e: e["type"] == "session.updated"
                                          and e["session"].get("instructions") == INSTRUCTIONS)
            assert [t["name"] for t in updated["session"]["tools"]] == ["lookup_order"]
            # The peer's spoken turn, as the backend sees it.
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            await backend.wait_for("input_audio_buffer.speech_stopped")
            await call.wait_for("output_audio_buffer.stopped", timeout=20)
            await backend.wait_for("output_audio_buffer.stopped")
            # The model calls the backend's tool; the backend answers; the peer hears the answer.
            call.send(user_says('Please use lookup_order {"id": 7}'))
            call.send({"type": "response.create"})
            done = await backend.wait_for(lambda e: e["type"] == "response.done" and any(
                item.get("type") == "function_call" for item in e["response"]["output"]))
            function_call = next(i for i in done["response"]["output"] if i["type"] == "function_call")
            assert function_call["name"] == "lookup_order" and json.loads(function_call["arguments"]) == {"id": 7}
            heard_before = len(call.audio)
            await connection.conversation.item.create(item={
                "type": "function_call_output", "call_id": function_call["call_id"], "output": "shipped"})
            await connection.response.create()
            transcript = await call.wait_for(lambda e: e["type"] == "response.output_audio_transcript.done"
                                             and "The tool returned: shipped" in e["transcript"])
            assert transcript
            await call.wait_for("output_audio_buffer.stopped", after=len(call.events) - 1, timeout=20)
            assert loud_ms(call.received()[sum(len(a) for a in call.audio[:heard_before]):])
            # Everything the peer was told since the attach, the backend was told too, in the same order.
            told = [e["event_id"] for e in call.events[attached_at:]]
            seen = [e["event_id"] for e in backend.events]
            common = min(len(told), len(seen))  # either may be an event or two ahead of the other
            assert common > 20 and told[:common] == seen[:common]
            # The peer hangs up: the backend gets its close, with the reason.
            await call.close()
            code, reason = await backend.closed()
            assert code == 1000 and reason.startswith("call ended"), (code, reason)
    finally:
        await call.close()
    async with asyncio.timeout(10):  # the route logs the detach once the close is done
        while "backend detached" not in single.output():
            await asyncio.sleep(0.05)
    assert re.search(r"backend attached.*\n(.*\n)*.*backend detached: call ended", single.output())


async def refused_attach(base: str, call_id: str, key: str | None, status: int, code: str) -> None:
    """The SDK's attach (with no key: a plain WebSocket client, the SDK insists on one) is refused so."""
    with pytest.raises(websockets.InvalidStatus) as caught:
        if key is None:
            async with websockets.connect(base.replace("http", "ws") + f"/v1/realtime?call_id={call_id}"):
                pass
        async with sdk(base, key) as client, client.realtime.connect(call_id=call_id):
            pass
    response = caught.value.response
    assert response.status_code == status and json.loads(response.body)["error"]["code"] == code, response.body


async def test_refusals_before_the_upgrade_and_the_key_as_a_subprotocol(single):
    call = await a_call(single.base)
    try:
        await refused_attach(single.base, call.call_id, None, 401, "missing_api_key")
        await refused_attach(single.base, call.call_id, "sk-wrong", 401, "invalid_api_key")
        async with sdk(single.base, KEY) as client:
            secret = await client.realtime.client_secrets.create()
        await refused_attach(single.base, call.call_id, secret.value, 401, "invalid_api_key")
        await refused_attach(single.base, "rtc_0nosuchcall", KEY, 404, "call_not_found")
        url = single.base.replace("http", "ws") + f"/v1/realtime?call_id={call.call_id}"
        async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as first:
            assert first.subprotocol == "realtime"
            await refused_attach(single.base, call.call_id, KEY, 429, "too_many_backends")  # one per call here
            async with aiohttp.ClientSession() as http, http.get(single.base + "/metrics") as scraped:
                assert "relay_backends_attached 1.0" in await scraped.text()
            await first.send(json.dumps({"type": "input_audio_buffer.append", "audio": ""}))
            error = json.loads(await asyncio.wait_for(first.recv(), 10))  # its error is its own
            assert error["type"] == "error" and error["error"]["code"] == "invalid_value"
        await asyncio.sleep(0.3)  # the first one's detach
        assert not [e for e in call.events if e["type"] == "error"]
        async with sdk(single.base, KEY) as client:
            await client.realtime.calls.hangup(call.call_id)
        await refused_attach(single.base, call.call_id, KEY, 404, "call_not_found")
    finally:
        await call.close()


# --- a backend that does not read -------------------------------------------------------------------------------


async def raw_backend(base: str, call_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that reads nothing until told: a 4 KiB receive buffer, the handshake by hand."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**24)
    writer.write(f"GET /v1/realtime?call_id={call_id} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


def masked_text(text: str) -> bytes:
    payload = text.encode()
    return bytes([0x81, 0x80 | 127]) + struct.pack(">Q", len(payload)) + b"\0\0\0\0" + payload  # mask 0: as is


async def close_frame(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read the server's frames up to its close frame: (code, reason)."""
    async with asyncio.timeout(20):
        while True:
            first, size = await reader.readexactly(2)
            size &= 0x7F
            if size >= 126:
                size = int.from_bytes(await reader.readexactly(2 if size == 126 else 8), "big")
            payload = await reader.readexactly(size)
            if first & 0x0F == 0x8:
                return struct.unpack(">H", payload[:2])[0], payload[2:].decode()


async def test_a_backend_that_does_not_read_is_closed_and_the_call_goes_on(single):
    call = await a_call(single.base)
    reader, writer = await raw_backend(single.base, call.call_id)
    try:
        # Each message comes back twice (item added, done). How much the kernel's socket buffers take before the
        # relay's 64 KiB queue fills varies with the machine, so keep talking (bounded: at most 36 MB back) until
        # the relay closes it while it reads nothing (the close frame waits).
        async with asyncio.timeout(60):
            for n in range(300):
                writer.write(masked_text(json.dumps(user_says(f"{n} " + "x" * 60_000))))
                await writer.drain()
                await asyncio.sleep(0.02)
                if "backend detached: backend too slow" in single.output():
                    break
            while "backend detached: backend too slow" not in single.output():
                await asyncio.sleep(0.05)
        code, reason = await close_frame(reader)
        assert code == 1008 and "too slow" in reason, reason
        heard = len(call.audio)
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)  # the call is unhurt
        done = await call.wait_for(lambda e: e["type"] == "response.done"
                                   and e["response"]["output"] and e["response"]["output"][0]["type"] == "message",
                                   timeout=20)
        assert done["response"]["status"] == "completed"
        await call.wait_for("output_audio_buffer.stopped", after=call.events.index(done), timeout=20)
        assert loud_ms(call.received()[sum(len(a) for a in call.audio[:heard]):])
    finally:
        writer.close()
        await call.close()


# --- two workers ------------------------------------------------------------------------------------------------


async def test_a_backend_reaches_the_worker_that_owns_the_call(simulator):
    async with relay_logged("--workers", "2", env=relay_env(simulator)) as relay:
        await refused_attach(relay.base, "rtc_1nosuchcall", KEY, 404, "call_not_found")
        for _ in range(12):  # the kernel spreads connections over the workers: a few calls are enough
            call = await a_call(relay.base)
            try:
                async with sdk(relay.base, KEY) as client, client.realtime.connect(call_id=call.call_id) as conn:
                    backend = Backend(conn)
                    await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS})
                    await call.wait_for(lambda e: e["type"] == "session.updated"
                                        and e["session"].get("instructions") == INSTRUCTIONS)
                    await backend.wait_for("session.updated")
                    await client.realtime.calls.hangup(call.call_id)
                    code, reason = await backend.closed()
                    assert code == 1000 and reason == "call ended: hangup", (code, reason)
            finally:
                await call.close()
            if "backend socket relayed to worker" in relay.output():
                break
        assert "backend socket relayed to worker" in relay.output()
