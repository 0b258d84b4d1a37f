"""Real calls: an aiortc client peer, the relay's aiohttp app, the simulator upstream, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from relay.config import Settings
from relay.server.app import create_app
from relay.call.call import Call
from relay.server.calls import CALLS, SETTINGS, TARGET
from relay.simulator.config import SimConfig
from relay.simulator.server import start_simulator
from relay.upstream.target import choose_upstream
from tests.audio_checks import best_alignment, loud_ms, tone
from tests.conftest import FAST
from tests.webrtc_client import call_relay, load_pcm48, silence48, strip_candidates

HELLO48 = load_pcm48("speech_hello_48k.wav")
ECHO_CORRELATION = 0.8  # two Opus passes and two resamplings measure ~0.89


async def _serve(settings: Settings):
    app = create_app(settings, choose_upstream(settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return app, runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


class Relay:
    def __init__(self, app, url, simulator):
        self.app, self.url, self.simulator = app, url, simulator

    @property
    def calls(self):
        return self.app[CALLS]

    def upstream_received(self, session_index: int = -1) -> list[dict]:
        return self.simulator.recorder.sessions[session_index].received


def relay_settings(upstream_url: str, **overrides) -> Settings:
    return Settings.load(env={}, upstream_url=upstream_url, ice_addresses="127.0.0.1", **overrides)


@pytest.fixture
async def relay(simulator):
    # Clients may set the whole session here (the default event policy has its own tests, test_policy.py).
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", call_idle_timeout_s="3",
                                                   client_session_fields="*"))
    yield Relay(app, url, simulator)
    await runner.cleanup()


async def _ended(relay: Relay, call_id: str, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while call_id in relay.calls:
            await asyncio.sleep(0.05)


# --- a whole turn ----------------------------------------------------------------------------------------------


async def test_a_call_echoes_speech_with_the_webrtc_event_sequence(relay):
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
        await call.wait_for("output_audio_buffer.stopped", timeout=20)
        types = call.types()
        assert types[0] == "session.created"
        assert "response.output_audio.delta" not in types  # audio goes by RTP only
        for earlier, later in [
            ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"),
            ("response.content_part.added", "output_audio_buffer.started"),
            ("output_audio_buffer.started", "output_audio_buffer.stopped"),
            ("response.done", "output_audio_buffer.stopped"),
        ]:
            assert types.index(earlier) < types.index(later), (earlier, later)
        started = next(e for e in call.events if e["type"] == "output_audio_buffer.started")
        done = next(e for e in call.events if e["type"] == "response.done")
        assert started["response_id"] == done["response"]["id"]
        _, score = best_alignment(call.received(), HELLO48)
        assert score >= ECHO_CORRELATION
        # The upstream heard the speech as a stream of 20 ms appends.
        appends = [e for e in relay.upstream_received() if e.get("type") == "input_audio_buffer.append"]
        assert appends and {e["audio_bytes"] for e in appends[1:-1]} == {960}
    finally:
        await call.close()


async def test_an_offer_without_candidates_connects_by_peer_reflexive_discovery(relay):
    call = await call_relay(relay.url, mutate_offer=strip_candidates)
    try:
        await call.wait_for("session.created")
        call.mic.say_between(HELLO48, lead_ms=200, tail_ms=900)
        await call.wait_for("response.done", timeout=20)
    finally:
        await call.close()


async def test_a_multipart_session_is_applied_before_the_answer(relay):
    session = {"type": "realtime", "instructions": "Be brief.", "audio": {"output": {"voice": "cedar"}}}
    call = await call_relay(relay.url, session=session)
    try:
        created = await call.wait_for("session.created")
        # One session.created carrying the posted session, as OpenAI sends it; no stray session.updated that a
        # client could take for the answer to its own first update.
        assert created["session"]["instructions"] == "Be brief." and created["session"]["audio"]["output"]["voice"] == "cedar"
        call.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Mine."}})
        updated = await call.wait_for("session.updated")
        assert updated["session"]["instructions"] == "Mine." and call.types()[:2] == ["session.created", "session.updated"]
        assert relay.upstream_received()[0]["type"] == "session.update"
    finally:
        await call.close()


# --- barge-in --------------------------------------------------------------------------------------------------


async def test_barge_in_stops_the_audio_and_truncates_to_what_the_client_heard(relay):
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        call.mic.say(silence48(400))
        call.mic.say(tone(1500))  # a steady tone: its cut point can be found to a few ms
        call.mic.say(silence48(600))
        started = await call.wait_for("output_audio_buffer.started", timeout=20)
        speech = next(e for e in call.events if e["type"] == "input_audio_buffer.speech_started")
        await asyncio.sleep(1.0)  # 300 ms of prefix padding, then ~700 ms of the echoed tone
        audio_before = len(call.audio)
        call.mic.say(tone(600, hz=660))  # the user talks over it
        cleared = await call.wait_for("output_audio_buffer.cleared", timeout=10)
        assert cleared["response_id"] == started["response_id"]
        await asyncio.sleep(0.5)  # let the client's jitter buffer release what was sent before the flush

        truncates = [e for e in relay.upstream_received() if e.get("type") == "conversation.item.truncate"]
        assert len(truncates) == 1
        audio_end_ms = truncates[0]["audio_end_ms"]

        received = call.received()
        echo = received[: sum(len(a) for a in call.audio[:audio_before]) + 48 * 2000]
        loud = loud_ms(echo)
        tone_heard_ms = loud[-1] + 5 - loud[0]  # first to last loud 5 ms window of the echoed tone
        # The echoed item is the committed audio: 300 ms of prefix padding before the tone (not clamped: the
        # microphone has been sending silence since the call began), then the tone.
        assert speech["audio_start_ms"] > 0
        heard_ms = 300 + tone_heard_ms  # in the item's own time, whether its leading silence played or was skipped
        assert abs(audio_end_ms - heard_ms) <= 20, (audio_end_ms, heard_ms)
        assert 300 < audio_end_ms < 300 + 1500  # cut inside the tone, not after it
    finally:
        await call.close()


async def test_client_output_audio_buffer_clear_flushes_cancels_and_truncates(simulator):
    slow = await start_simulator(SimConfig(**{**FAST.__dict__, "speed": 1.0}))  # still generating while it plays
    app, runner, url = await _serve(relay_settings(slow.url))
    relay = Relay(app, url, slow)
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=900)
        await call.wait_for("output_audio_buffer.started", timeout=20)
        await asyncio.sleep(0.4)
        call.send({"type": "response.cancel"})
        call.send({"type": "output_audio_buffer.clear"})
        await call.wait_for("output_audio_buffer.cleared")
        done = await call.wait_for("response.done")
        assert done["response"]["status"] == "cancelled"
        async with asyncio.timeout(5):
            while not any(e.get("type") == "conversation.item.truncate" for e in relay.upstream_received()):
                await asyncio.sleep(0.05)
        # The client's own cancel and the relay's both reached upstream; the loser's error never reaches the client.
        await asyncio.sleep(0.3)
        errors = [e for e in call.events if e["type"] == "error"]
        assert errors == []
    finally:
        await call.close()
        await runner.cleanup()
        await slow.stop()


# --- the data channel ------------------------------------------------------------------------------------------


async def test_bad_data_channel_messages_get_errors_and_reach_nobody(relay):
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        bad = [
            ("{not json", "invalid_json"),
            (json.dumps({"type": "no.such.event"}), "invalid_value"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), "invalid_value"),
        ]
        for number, (text, code) in enumerate(bad):
            call.send(text)
            error = await call.wait_for("error", after=len(call.events))
            assert error["error"]["code"] == code, text
        call.channel.send(b"\x00binary")
        assert (await call.wait_for("error", after=len(call.events)))["error"]["code"] == "invalid_event"
        # Fields the relay does not act on are the upstream's to judge, as on OpenAI's own endpoint.
        call.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "bogus": 1}}))
        error = await call.wait_for("error", after=len(call.events))
        assert (error["error"]["code"], error["error"]["param"]) == ("unknown_parameter", "session.bogus")
        call.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
        await call.wait_for("response.done")
        forwarded = [e.get("type") for e in relay.upstream_received() if e.get("type") != "input_audio_buffer.append"]
        assert forwarded == ["session.update", "response.create"]
    finally:
        await call.close()


# --- ending calls ----------------------------------------------------------------------------------------------


async def test_hangup_and_delete_end_calls_and_free_everything(relay):
    baseline = len(asyncio.all_tasks())
    async with aiohttp.ClientSession() as http:
        for method in ("hangup", "delete"):
            call = await call_relay(relay.url)
            await call.wait_for("session.created")
            relay_call = relay.calls[call.call_id]
            if method == "hangup":
                async with http.post(f"{relay.url}{call.location}/hangup") as response:
                    assert response.status == 200
            else:
                async with http.delete(f"{relay.url}{call.location}") as response:
                    assert response.status == 204
            assert call.call_id not in relay.calls
            assert relay_call.closed.is_set() and not relay_call.tasks
            assert relay_call.peer.pc.connectionState == "closed"
            assert relay.simulator.recorder.sessions[-1].ended_at is not None or await relay.simulator.recorder.wait_for(
                lambda: relay.simulator.recorder.sessions[-1].ended_at)
            async with http.post(f"{relay.url}{call.location}/hangup") as response:
                assert response.status == 404 and (await response.json())["error"]["code"] == "call_not_found"
            await call.close()
    async with asyncio.timeout(10):
        while [t for t in asyncio.all_tasks() if t.get_name().startswith("call-")] or len(asyncio.all_tasks()) > baseline:
            await asyncio.sleep(0.1)


async def test_a_client_that_vanishes_is_detected_and_freed(relay):
    call = await call_relay(relay.url)
    await call.wait_for("session.created")
    relay_call = relay.calls[call.call_id]
    await call.close()  # the peer goes away without hanging up
    await _ended(relay, call.call_id)
    assert relay_call.close_reason in {"peer connection closed", "peer connection failed", "idle: no media or messages"}
    await relay.simulator.recorder.wait_for(lambda: relay.simulator.recorder.sessions[-1].ended_at)


async def test_with_retries_off_an_upstream_that_drops_ends_the_call_with_an_error_event(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url + "?sim_close_after_s=1.5", upstream_retries="0"))
    relay = Relay(app, url, simulator)
    call = await call_relay(relay.url)
    try:
        error = await call.wait_for("error", timeout=10)
        assert error["error"]["code"] == "upstream_closed"
        await _ended(relay, call.call_id)
    finally:
        await call.close()
        await runner.cleanup()


# --- bad offers and dead upstreams -----------------------------------------------------------------------------


async def _post(url: str, data, content_type: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/realtime/calls", data=data, headers=headers) as response:
            return response.status, await response.json()


VIDEO_ONLY = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\n"
BROKEN_AUDIO = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"


@pytest.mark.parametrize(
    "body, content_type, status, code",
    [
        ("v=0\r\n", "text/plain", 415, "unsupported_media_type"),
        ("hello", "application/sdp", 400, "invalid_offer"),
        (VIDEO_ONLY, "application/sdp", 400, "invalid_offer"),
        (BROKEN_AUDIO, "application/sdp", 400, "invalid_offer"),  # no ICE credentials, no DTLS fingerprint
        ("v=0\r\nm=audio " + "x" * 70_000, "application/sdp", 413, "request_too_large"),
        (b"\xff\xfe\x00v=0", "application/sdp", 400, "invalid_offer"),
    ],
    ids=["wrong-type", "not-sdp", "no-audio", "unusable-audio", "too-large", "not-utf8"],
)
async def test_bad_offers_get_a_4xx_with_a_json_error(relay, body, content_type, status, code):
    got_status, body_json = await _post(relay.url, body, content_type)
    assert (got_status, body_json["error"]["code"]) == (status, code)
    assert set(body_json["error"]) == {"message", "type", "code", "param"}
    assert relay.calls == {}


async def test_bad_multipart_bodies_get_a_400(relay):
    form = aiohttp.FormData()
    form.add_field("session", "{}", content_type="application/json")
    status, body = await _post(relay.url, form, None)
    assert (status, body["error"]["code"]) == (400, "missing_sdp")
    form = aiohttp.FormData()
    form.add_field("sdp", BROKEN_AUDIO, content_type="application/sdp")
    form.add_field("session", "not json", content_type="application/json")
    status, body = await _post(relay.url, form, None)
    assert (status, body["error"]["code"]) == (400, "invalid_session")


async def test_a_session_the_upstream_refuses_is_a_400_naming_the_parameter(relay):
    with pytest.raises(AssertionError, match="400") as failure:
        await call_relay(relay.url, session={"type": "realtime", "temperature": 0.8})
    assert "unknown_parameter" in str(failure.value) and "session.temperature" in str(failure.value)
    assert relay.calls == {}


async def _refused_call(upstream_url: str, **settings) -> str:
    """Call a relay whose upstream is `upstream_url`; the relay must refuse: return its answer as text."""
    app, runner, url = await _serve(relay_settings(upstream_url, **settings))
    try:
        with pytest.raises(AssertionError, match="relay answered") as failure:
            await call_relay(url)
        assert app[CALLS] == {}
        return str(failure.value)
    finally:
        await runner.cleanup()


async def test_a_dead_upstream_is_a_502(unused_tcp_port):
    answer = await _refused_call(f"ws://127.0.0.1:{unused_tcp_port}/v1/realtime")
    assert "502" in answer and "upstream_unavailable" in answer


async def test_an_upstream_refusing_the_key_is_a_502(simulator):
    answer = await _refused_call(simulator.url + "?sim_reject_auth=1")
    assert "502" in answer and "upstream_refused" in answer
    assert "sim_reject_auth" not in answer  # no internal detail leaks


async def test_a_silent_upstream_is_a_503(simulator):
    answer = await _refused_call(simulator.url + "?sim_stall_after_events=0&sim_stall_s=10", upstream_timeout_s="1")
    assert "503" in answer and "upstream_timeout" in answer


async def test_with_interruptions_off_the_model_talks_through(simulator):
    slow = await start_simulator(SimConfig(**{**FAST.__dict__, "speed": 1.0}))
    app, runner, url = await _serve(relay_settings(slow.url, interruptions="false"))
    relay = Relay(app, url, slow)
    call = await call_relay(relay.url)
    try:
        created = await call.wait_for("session.created")  # the relay set it before answering
        assert created["session"]["audio"]["input"]["turn_detection"]["interrupt_response"] is False
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=700)
        await call.wait_for("output_audio_buffer.started", timeout=20)
        await asyncio.sleep(0.3)
        call.mic.say(HELLO48)  # talking over the model
        await call.wait_for(lambda e: e["type"] == "input_audio_buffer.speech_started", after=len(call.events))
        done = await call.wait_for("response.done")
        assert done["response"]["status"] == "completed"
        await call.wait_for("output_audio_buffer.stopped", timeout=20)
        assert "output_audio_buffer.cleared" not in call.types()
        assert not any(e.get("type") in {"conversation.item.truncate", "response.cancel"} for e in relay.upstream_received())
    finally:
        await call.close()
        await runner.cleanup()
        await slow.stop()


# --- regressions from review ---------------------------------------------------------------------------------------


async def test_retrieving_a_long_item_keeps_the_call_up_and_leaves_its_audio_out(relay):
    # The official SDK retrieves items after every transcription; with their audio they outgrow the channel.
    call = await call_relay(relay.url, session={"type": "realtime", "audio": {"input": {"transcription": {"model": "m"}}}})
    try:
        await call.wait_for("session.created")
        call.mic.say_between(np.concatenate([HELLO48] * 4), lead_ms=300, tail_ms=900)  # ~7 s: ~340 KB of base64
        done = await call.wait_for("conversation.item.input_audio_transcription.completed", timeout=30)
        call.send({"type": "conversation.item.retrieve", "item_id": done["item_id"]})
        retrieved = await call.wait_for("conversation.item.retrieved")
        part = retrieved["item"]["content"][0]
        assert "audio" not in part and part["transcript"].startswith("[speech")
        assert call.call_id in relay.calls
    finally:
        await call.close()


async def test_an_offer_with_none_of_opus_pcmu_pcma_is_a_400(relay):
    def g722_only(sdp: str) -> str:
        """The client's offer with Opus, PCMU and PCMA taken out (their payload types and every line about them)."""
        gone = {re.search(rf"a=rtpmap:(\d+) {name}", sdp).group(1) for name in ("opus/48000", "PCMU/8000", "PCMA/8000")}
        lines = [line for line in sdp.split("\r\n")
                 if not any(re.match(rf"a=(rtpmap|fmtp|rtcp-fb):{pt}\b", line) for pt in gone)]
        return "\r\n".join(
            " ".join(p for p in line.split(" ") if p not in gone) if line.startswith("m=audio") else line for line in lines
        )

    with pytest.raises(AssertionError, match="400") as failure:
        await call_relay(relay.url, mutate_offer=g722_only)
    assert "invalid_offer" in str(failure.value) and "Opus, PCMU or PCMA" in str(failure.value) and relay.calls == {}


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"--x\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\nv=0\r\n--x--\r\n", "multipart/form-data"),  # no boundary
        (b"--x\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\nv=0 unfinished", "multipart/form-data; boundary=x"),
        (b"--x\r\nContent-Type: multipart/mixed; boundary=y\r\n\r\n--y\r\n\r\nz\r\n--y--\r\n--x--\r\n", "multipart/form-data; boundary=x"),
        (b"--x\r\nContent-Disposition: form-data; name=\"session\"\r\n\r\n" + b"[" * 60000 + b"\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    ],
    ids=["no-boundary", "truncated", "nested", "deep-json"],
)
async def test_malformed_multipart_bodies_are_a_400_not_a_500(relay, body, content_type):
    status, answer = await _post(relay.url, body, content_type)
    assert status == 400 and answer["error"]["code"] in {"invalid_multipart", "invalid_session", "missing_sdp"}


async def test_an_upstream_speaking_garbage_is_a_502():
    async def garbage(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("[]")
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", garbage)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        answer = await _refused_call(f"ws://127.0.0.1:{runner.addresses[0][1]}/v1/realtime")
        assert "502" in answer and "upstream_protocol_error" in answer
    finally:
        await runner.cleanup()


class StubChannel:
    """Stands for aiortc's RTCDataChannel: refuses messages over `limit` as aiortc does."""

    def __init__(self, limit: int = 1000, buffered: int = 0) -> None:
        self.limit, self.bufferedAmount, self.readyState, self.sent = limit, buffered, "open", []

    def send(self, text: str) -> None:
        if len(text) > self.limit:
            raise ValueError("Cannot send message of %d bytes" % len(text))
        self.sent.append(json.loads(text))


async def test_an_event_too_large_for_the_channel_becomes_an_error_event(relay):
    call = Call(relay.app[SETTINGS], relay.app[TARGET], on_closed=lambda c: None)
    call.peer.channel = StubChannel(limit=1000)
    call.peer.send_text(json.dumps({"type": "session.updated", "session": {"instructions": "x" * 5000}}))
    (sent,) = call.peer.channel.sent
    assert sent["type"] == "error" and sent["error"]["code"] == "event_too_large"
    call.peer.channel = StubChannel(buffered=64 * 1024 * 1024)  # the client stopped acknowledging
    call.peer.send_text("{}")
    await asyncio.wait_for(call.closed.wait(), 5)
    assert call.close_reason == "client not reading its data channel"


async def test_the_page_and_its_client_config_are_served_without_secrets(simulator):
    settings = Settings.load(env={"RELAY_UPSTREAM_API_KEY": "sk-canary-page", "RELAY_PRICES": '{"audio_output": 50}'},
                             upstream_url=simulator.url, ice_addresses="127.0.0.1",
                             ice_servers='[{"urls": "stun:stun.example.org:3478"}]')
    app, runner, url = await _serve(settings)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/") as response:
                page = await response.text()
                assert response.status == 200 and "<title>relay" in page and 'src="/static/app.js"' in page
            for asset in ("app.js", "style.css"):
                async with http.get(f"{url}/static/{asset}") as response:
                    assert response.status == 200
            async with http.get(url + "/relay/client-config") as response:
                text = await response.text()
        config = json.loads(text)
        assert config["ice_servers"] == [{"urls": "stun:stun.example.org:3478"}] and config["locked"] == [
            "instructions", "model", "parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools", "tracing"]
        assert config["prices"]["audio_output"] == 50 and config["prices"]["audio_input"] == 32
        assert "sk-canary-page" not in text
    finally:
        await runner.cleanup()
