"""The simulator at its edges: auth, bad input, expiry, injected faults, concurrency and its records."""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave

import aiohttp
import pytest
import websockets

from relay.simulator.config import SimConfig
from relay.simulator.server import start_simulator
from tests.conftest import FAST
from tests.helpers import BYTES_PER_MS, audio_of, connect, load_pcm, ms_of, silence
from tests.oracle import SESSION_MODELS

HELLO = load_pcm("speech_hello_24k.wav")


@pytest.fixture
async def keyed():
    sim = await start_simulator(SimConfig(**{**FAST.__dict__, "api_key": "sk-sim-right"}))
    yield sim
    await sim.stop()


async def _refused(url: str, **kwargs) -> tuple[dict, int]:
    """Connect; the handshake succeeds, then comes one error event and a close. Returns both."""
    async with connect(url, **kwargs) as client:
        error = (await client.recv())["error"]
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv()
        return error, client.ws.close_code


@pytest.mark.parametrize(
    "key, headers",
    [(None, {}), ("sk-sim-wrong", {}), (None, {"api-key": "sk-sim-wrong"})],
    ids=["missing", "wrong-bearer", "wrong-api-key-header"],
)
async def test_a_missing_or_wrong_key_gets_invalid_api_key_and_close_3000(keyed, key, headers):
    error, code = await _refused(keyed.url, key=key, headers=headers)
    assert (error["code"], code) == ("invalid_api_key", 3000)
    assert "sk-sim" not in error["message"]  # a key is never echoed back


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": "sk-sim-right"},
        {"headers": {"api-key": "sk-sim-right"}},  # Azure's header
        {"subprotocols": ["realtime", "openai-insecure-api-key.sk-sim-right"]},  # browsers
    ],
    ids=["bearer", "api-key", "subprotocol"],
)
async def test_the_right_key_is_accepted_in_every_form(keyed, kwargs):
    async with connect(keyed.url, **kwargs) as client:
        assert (await client.recv())["type"] == "session.created"
    assert keyed.recorder.sessions[-1].authorized


async def test_reject_auth_knob_refuses_any_key(simulator):
    error, code = await _refused(simulator.url + "?sim_reject_auth=true", key="anything")
    assert (error["code"], code) == ("invalid_api_key", 3000)


async def test_the_beta_header_is_refused_like_ga_does(url):
    error, code = await _refused(url, headers={"OpenAI-Beta": "realtime=v1"})
    assert (error["code"], code) == ("beta_api_shape_disabled", 4000)


async def test_every_model_name_of_the_sdk_types_is_served(simulator):
    for model in SESSION_MODELS:
        async with connect(f"{simulator.url}?model={model}") as client:
            assert (await client.until("session.created"))["session"]["model"] == model


async def test_a_malformed_model_name_is_refused(simulator):
    error, code = await _refused(simulator.url + "?model=no%20such%20model")
    assert (error["code"], code) == ("model_not_found", 4000)


async def test_an_unknown_knob_is_an_http_400(simulator):
    with pytest.raises(websockets.InvalidStatus) as failure:
        async with connect(simulator.url + "?sim_colse_after_events=3"):
            pass
    assert failure.value.response.status_code == 400


async def test_bad_input_gets_errors_and_the_session_goes_on(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(audio={"input": {"turn_detection": None}})
        cases = [
            ("this is not json", "invalid_json"),
            (b"\x00\x01binary", "invalid_event"),
            ({"type": "input_audio_buffer.appendix", "audio": ""}, "invalid_value"),
            ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}, "invalid_value"),
            ({"type": "response.create", "response": {"output_modalities": "audio"}}, "invalid_type"),
            ({"event_id": "no type"}, "missing_required_parameter"),
            ('["an", "array"]', "invalid_json"),
        ]
        for raw, code in cases:
            await client.send(raw, check=False)
            assert (await client.error())["code"] == code, raw
        # Nothing above broke the session.
        await client.append(HELLO)
        await client.send({"type": "input_audio_buffer.commit"})
        await client.send({"type": "response.create"})
        events = await client.collect("response.done")
        assert audio_of(events) == HELLO


async def test_session_expiry_sends_session_expired_and_closes(simulator):
    async with connect(simulator.url + "?sim_max_session_s=0.5") as client:
        created = await client.recv()
        assert created["session"]["expires_at"] <= time.time() + 1
        error = await client.error(timeout=5)
        assert error["code"] == "session_expired"
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 1000


async def test_close_after_events_fault(simulator):
    async with connect(simulator.url + "?sim_close_after_events=2&sim_close_code=1011") as client:
        await client.recv()
        await client.send({"type": "session.update", "session": {"type": "realtime"}})
        await client.recv()
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv()
        assert client.ws.close_code == 1011


async def test_abrupt_close_fault_looks_like_a_dropped_connection(simulator):
    async with connect(simulator.url + "?sim_close_after_events=1&sim_close_abruptly=1") as client:
        await client.recv()
        with pytest.raises(websockets.ConnectionClosedError):
            await client.recv()
        assert client.ws.close_code == 1006


async def test_close_after_seconds_fault(simulator):
    async with connect(simulator.url + "?sim_close_after_s=0.3") as client:
        await client.recv()
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv(timeout=5)
        assert client.ws.close_code == 1011


async def test_stall_fault_holds_events_back(simulator):
    async with connect(simulator.url + "?sim_stall_after_events=1&sim_stall_s=0.6") as client:
        await client.recv()
        sent_at = asyncio.get_running_loop().time()
        await client.send({"type": "session.update", "session": {"type": "realtime"}})
        await client.until("session.updated", timeout=5)
        assert asyncio.get_running_loop().time() - sent_at >= 0.6  # a lower bound only: never flaky


async def test_concurrent_sessions_are_independent(url):
    async def one_turn(ms: int) -> int:
        async with connect(url) as client:
            await client.until("session.created")
            await client.update(audio={"input": {"turn_detection": None}})
            await client.append(HELLO[: ms * BYTES_PER_MS])
            await client.send({"type": "input_audio_buffer.commit"})
            await client.send({"type": "response.create"})
            return ms_of(audio_of(await client.collect("response.done")))

    lengths = [200 + 100 * i for i in range(12)]
    assert await asyncio.gather(*(one_turn(ms) for ms in lengths)) == lengths


async def test_records_hold_what_each_session_received(simulator, url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.send({"type": "session.update", "event_id": "evt_rec", "session": {"type": "realtime", "instructions": "Recorded."}})
        await client.until("session.updated")
        await client.append(silence(300) + HELLO)
        await client.send("garbage", check=False)
        await client.error()
        session_id = client.events[0]["session"]["id"]
    record = await simulator.recorder.wait_for(lambda: simulator.recorder.find(session_id).ended_at and simulator.recorder.find(session_id))
    assert record.received[0] == {"type": "session.update", "event_id": "evt_rec", "session": {"type": "realtime", "instructions": "Recorded."}}
    appends = [e for e in record.received if e.get("type") == "input_audio_buffer.append"]
    assert sum(e["audio_bytes"] for e in appends) == len(silence(300) + HELLO)
    assert "audio" not in appends[0]  # audio is kept once, as audio, not in every event
    assert bytes(record.input_audio) == silence(300) + HELLO
    assert record.received[-1] == {"unparsed": "garbage"}
    assert record.sent_types[0] == "session.created"

    async with aiohttp.ClientSession() as http:
        base = simulator.url.replace("ws://", "http://").removesuffix("/v1/realtime")
        async with http.get(f"{base}/v1/simulator/sessions") as response:
            summaries = await response.json()
        assert [s["session_id"] for s in summaries] == [session_id]
        assert summaries[0]["input_audio_ms"] == ms_of(silence(300) + HELLO)
        async with http.get(f"{base}/v1/simulator/sessions/{session_id}") as response:
            shown = await response.json()
        assert shown["received"][0]["event_id"] == "evt_rec"
        # Monotonic times, for benchmarks in other processes: one per sent event, one per append, in order.
        assert len(shown["sent_at"]) == len(shown["sent_types"]) and shown["sent_at"] == sorted(shown["sent_at"])
        assert [total for _, total in shown["append_arrivals"]][-1] == len(silence(300) + HELLO)
        assert record.started_at and shown["sent_at"][0] <= time.monotonic()
        async with http.get(f"{base}/v1/simulator/sessions/{session_id}/input_audio.wav") as response:
            with wave.open(io.BytesIO(await response.read())) as wav:
                assert wav.readframes(wav.getnframes()) == silence(300) + HELLO
        async with http.get(f"{base}/v1/simulator/sessions/sess_unknown") as response:
            assert response.status == 404 and "error" in json.loads(await response.text())
        async with http.delete(f"{base}/v1/simulator/sessions") as response:
            assert response.status == 200
        assert len(simulator.recorder.sessions) == 0


async def test_output_audio_buffer_clear_is_webrtc_only(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.send({"type": "output_audio_buffer.clear", "event_id": "evt_clear"})
        error = await client.error()
        assert error["event_id"] == "evt_clear" and error["code"] == "invalid_value"


async def test_close_after_an_event_type_fault_and_knobs_changed_for_the_next_connections(simulator):
    simulator.reconfigure(close_after_event_type="session.updated")
    async with connect(simulator.url) as client:
        simulator.reconfigure(close_after_event_type=None)  # a connection keeps the knobs it started with
        await client.recv()
        await client.send({"type": "session.update", "session": {"type": "realtime"}})
        assert (await client.recv())["type"] == "session.updated"
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv()
    async with connect(simulator.url) as client:  # the next connection has the changed knobs: no fault
        await client.recv()
        assert (await client.update(instructions="Hi."))["instructions"] == "Hi."
