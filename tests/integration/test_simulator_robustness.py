"""Regression tests for the simulator's connection-level robustness fixes, over real WebSockets on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import aiohttp
import pytest
import websockets

from relay.simulator.config import SimConfig
from relay.simulator.server import start_simulator
from tests.conftest import FAST
from tests.helpers import connect, load_pcm, silence

HELLO = load_pcm("speech_hello_24k.wav")


async def _still_answers(client) -> None:
    """The session is alive: a valid event gets its normal answer."""
    updated = await client.update(instructions="still here")
    assert updated["instructions"] == "still here"


# --- 1. an odd number of audio bytes ---------------------------------------------------------------------------------


async def test_an_append_with_an_odd_number_of_bytes_is_an_error_not_a_dead_connection(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.send({"type": "input_audio_buffer.append", "event_id": "evt_odd", "audio": base64.b64encode(b"\x01").decode()})
        error = await client.error()
        assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "audio", "evt_odd")
        await _still_answers(client)
        assert client.ws.close_code is None


# Regression: the record once kept the bytes of an append the session refused, shifting every later sample.
async def test_a_rejected_odd_append_does_not_shift_the_recorded_audio(simulator, url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(audio={"input": {"turn_detection": None}})
        await client.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01").decode()})
        assert (await client.error())["code"] == "invalid_value"
        await client.append(HELLO)
        await _still_answers(client)  # everything sent before has been recorded
    assert bytes(simulator.recorder.sessions[-1].input_audio) == HELLO


# --- 3. deeply nested JSON ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000], ids=["100000-deep-array", "5000-deep-object"]
)
async def test_deeply_nested_json_is_an_error_and_the_connection_stays_up(url, raw):
    async with connect(url) as client:
        await client.until("session.created")
        await client.send(raw, check=False)
        assert (await client.error())["code"] in ("invalid_json", "invalid_value")
        await _still_answers(client)


# --- 5. a knob out of range on the URL ----------------------------------------------------------------------------


async def test_an_out_of_range_knob_on_the_url_is_an_http_400_and_others_are_still_served(simulator, url):
    with pytest.raises(websockets.InvalidStatus) as failure:
        async with connect(simulator.url + "?sim_delta_ms=0"):
            pass
    assert failure.value.response.status_code == 400
    async with connect(url) as client:
        assert (await client.recv())["type"] == "session.created"


# --- 6. a client that stops reading -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_client_that_stops_reading_stops_being_read(simulator):
    """3000 retrieves of an unknown id, each answered by an ~8 KB error, while the client reads nothing: once the
    socket buffers are full the simulator must stop reading (at a backlog of 1000 events) instead of queueing every
    answer in memory. Then, once the client reads, everything is answered."""
    count = 3000
    event = json.dumps({"type": "conversation.item.retrieve", "item_id": "item_" + "x" * 8000})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # keep the kernel from buffering megabytes for us
    sock.connect(("127.0.0.1", simulator.port))
    sock.setblocking(False)
    async with websockets.connect(simulator.url, sock=sock, max_queue=4, compression=None, max_size=None) as ws:

        async def send_all() -> None:
            for _ in range(count):
                await ws.send(event)

        sender = asyncio.create_task(send_all())
        try:
            record = await simulator.recorder.wait_for(lambda: simulator.recorder.sessions and simulator.recorder.sessions[-1])
            # Bounded polling: wait until the number of events the simulator has read stops growing.
            seen, steady = -1, 0
            async with asyncio.timeout(10):
                while steady < 5 and seen < count:
                    await asyncio.sleep(0.1)
                    steady = steady + 1 if len(record.received) == seen else 0
                    seen = len(record.received)
            assert seen < 2200, f"the simulator read {seen} of {count} events from a client that reads nothing"

            answers = []
            async with asyncio.timeout(15):
                while len(answers) < count + 1:  # session.created, then one error per retrieve
                    answers.append(json.loads(await ws.recv()))
                await sender
        finally:
            sender.cancel()
    assert answers[0]["type"] == "session.created"
    assert {e["error"]["code"] for e in answers[1:]} == {"item_retrieve_invalid_item_id"}
    assert len(record.received) == count


# --- 7. records of large events --------------------------------------------------------------------------------------


async def test_records_strip_item_audio_and_summarise_oversized_events(simulator, url):
    audio = base64.b64encode(silence(100)).decode()
    audio_item = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]}
    big = {"type": "conversation.item.create", "event_id": "evt_big",
           "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 70_000}]}}
    async with connect(url) as client:
        await client.until("session.created")
        await client.send({"type": "conversation.item.create", "event_id": "evt_audio", "item": audio_item})
        await client.until("conversation.item.done")
        await client.send(big)
        await client.until("conversation.item.done")
    record = simulator.recorder.sessions[-1]
    assert record.received[0] == {
        "type": "conversation.item.create", "event_id": "evt_audio",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio_chars": len(audio)}]},
    }
    assert record.received[1] == {"type": "conversation.item.create", "event_id": "evt_big", "oversized_chars": len(json.dumps(big))}


# Regression: an append with extra fields once skipped the 64 KiB rule and was recorded whole.
async def test_an_oversized_append_with_extra_fields_is_not_recorded_whole(simulator, url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.send({"type": "input_audio_buffer.append", "event_id": "evt_pad", "audio": "AAAA", "pad": "x" * 70_000}, check=False)
        assert (await client.error())["code"] == "unknown_parameter"
    recorded = simulator.recorder.sessions[-1].received[-1]
    assert (recorded["type"], recorded["event_id"]) == ("input_audio_buffer.append", "evt_pad")
    assert len(json.dumps(recorded)) <= 64 * 1024


# --- 8. shutdown -------------------------------------------------------------------------------------------------


async def test_shutdown_closes_connected_clients_with_1001():
    sim = await start_simulator(FAST, "127.0.0.1", 0)
    try:
        async with connect(sim.url) as client:
            await client.until("session.created")
            await asyncio.wait_for(sim.stop(), 10)
            with pytest.raises(websockets.ConnectionClosed):
                await client.recv()
            assert client.ws.close_code == 1001
    finally:
        await sim.stop()


# --- 24. the record endpoints need the key --------------------------------------------------------------------------


async def test_record_endpoints_need_the_key_when_one_is_set():
    sim = await start_simulator(SimConfig(**{**FAST.__dict__, "api_key": "k"}), "127.0.0.1", 0)
    try:
        sessions = sim.url.replace("ws://", "http://").removesuffix("/v1/realtime") + "/v1/simulator/sessions"
        async with aiohttp.ClientSession() as http:
            async with http.get(sessions) as response:
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_api_key"
            async with http.get(sessions, headers={"Authorization": "Bearer wrong"}) as response:
                assert response.status == 401
            async with http.get(sessions, headers={"Authorization": "Bearer k"}) as response:
                assert response.status == 200 and await response.json() == []
    finally:
        await sim.stop()
