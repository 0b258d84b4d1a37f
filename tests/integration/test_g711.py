"""G.711 calls (issue 17): an aiortc client that offers only PCMU or only PCMA, the relay, the simulator speaking
`audio/pcmu` / `audio/pcma` upstream, all on 127.0.0.1. Negotiation, pass-through both ways (upstream appends and
RTP), the forced format, barge-in and truncation, loss filling, recordings, metrics, the sideband and reconnects.

The client's microphone is 48 kHz; aiortc's own G.711 encoder takes it to 8 kHz, and what the client receives is
8 kHz (`call.rate`). Every wait is bounded; no assertion is about how long something took."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import wave

import aiohttp
import numpy as np
import pytest

from relay.server.calls import CALLS
from relay.simulator.server import SessionRecord
from tests.audio_checks import best_alignment, decode_g711, loud_ms, loud_span_ms, resample, tone
from tests.integration.test_drain_and_metrics import scrape, value
from tests.integration.test_openai_sdk import KEY, offer_through, sdk
from tests.integration.test_sideband import Backend, relay_env, user_says
from tests.integration.test_webrtc_call import HELLO48, Relay, _ended, _serve, relay_settings
from tests.processes import relay_logged
from tests.webrtc_client import FRAME, ClientCall, call_relay, silence48

LAWS = ["PCMU", "PCMA"]
PAYLOAD_TYPE = {"PCMU": 0, "PCMA": 8}
PCM24 = {"type": "audio/pcm", "rate": 24000}
HELLO8 = resample(HELLO48, 48000, 8000)
ECHO_CORRELATION = 0.8  # G.711 twice and four resamplings (48k -> 8k -> 24k -> 8k) measure well above it
FRAME_BYTES = 160  # 20 ms of G.711
PT_MS = 20


def fmt(law: str) -> dict:
    return {"type": f"audio/{law.lower()}"}


def formats(session: dict) -> tuple[dict, dict]:
    return session["audio"]["input"]["format"], session["audio"]["output"]["format"]


@pytest.fixture(params=LAWS)
def law(request) -> str:
    return request.param


@pytest.fixture
async def relay(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", call_idle_timeout_s="3",
                                                   client_session_fields="*"))
    yield Relay(app, url, simulator)
    await runner.cleanup()


@pytest.fixture
def sent_upstream(monkeypatch) -> dict[str, bytearray]:
    """The bytes of every append each simulator session received (by connection id), as they came over the
    WebSocket: the recorder's own `input_audio` holds them decoded to 24 kHz PCM16, as the session hears them."""
    kept: dict[str, bytearray] = {}
    on_received = SessionRecord.on_received

    def spy(self, text: str, *args, **kwargs):
        event = json.loads(text)
        if event.get("type") == "input_audio_buffer.append":
            kept.setdefault(self.connection_id, bytearray()).extend(base64.b64decode(event["audio"]))
        return on_received(self, text, *args, **kwargs)

    monkeypatch.setattr(SessionRecord, "on_received", spy)
    return kept


def audio_section(sdp: str) -> list[str]:
    """The lines of the SDP's audio m-section, its m= line first."""
    lines = sdp.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("m=audio"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    return lines[start:end]


def with_telephone_event(sdp: str) -> str:
    """The offer with RFC 4733 telephone-event/8000 (payload type 101) added to its audio, as SIP gateways offer."""
    lines = sdp.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("m=audio"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    last_rtpmap = max(i for i in range(start, end) if lines[i].startswith("a=rtpmap:"))
    lines[start] += " 101"
    lines[last_rtpmap + 1:last_rtpmap + 1] = ["a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"]
    return "\r\n".join(lines)


def upstream_session_updates(relay: Relay, session_index: int = -1) -> list[dict]:
    return [e["session"] for e in relay.upstream_received(session_index) if e.get("type") == "session.update"]


def appends(received: list[dict]) -> list[dict]:
    return [e for e in received if e.get("type") == "input_audio_buffer.append"]


def heard_since(call: ClientCall, frames_before: int) -> np.ndarray:
    """The audio the client received after its first `frames_before` frames."""
    return np.concatenate(call.audio[frames_before:]) if len(call.audio) > frames_before else np.zeros(0, "<i2")


async def until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


# --- negotiation --------------------------------------------------------------------------------------------------


async def test_a_g711_offer_is_answered_with_its_static_payload_type_alone(relay, law):
    offers: list[str] = []
    call = await call_relay(relay.url, codecs=[law], mutate_offer=lambda sdp: offers.append(
        with_telephone_event(sdp)) or offers[-1])
    try:
        offered = audio_section(offers[0])
        assert offered[0].split()[3:] == [str(PAYLOAD_TYPE[law]), "101"] and "a=rtpmap:101 telephone-event/8000" in offered
        section = audio_section(call.answer_sdp)
        pt = PAYLOAD_TYPE[law]
        assert section[0].split()[3:] == [str(pt)], section[0]
        assert [line for line in section if line.startswith("a=rtpmap:")] == [f"a=rtpmap:{pt} {law}/8000"]
        assert not [line for line in section if line.startswith("a=fmtp:")]
        assert not re.search(r"opus|telephone-event", call.answer_sdp, re.I)
        assert (call.codec, call.rate) == (law.lower(), 8000)
        created = await call.wait_for("session.created")
        assert formats(created["session"]) == (fmt(law), fmt(law))
        # The upstream session was opened on the same format, both ways.
        assert formats(upstream_session_updates(relay)[0]) == (fmt(law), fmt(law))
    finally:
        await call.close()


@pytest.mark.parametrize("offered, chosen", [(["PCMA", "PCMU"], "PCMA"), (["PCMU", "PCMA"], "PCMU")],
                         ids=["pcma-then-pcmu", "pcmu-then-pcma"])
async def test_of_two_g711_codecs_the_first_offered_is_chosen(relay, offered, chosen):
    call = await call_relay(relay.url, codecs=offered)
    try:
        assert audio_section(call.answer_sdp)[0].split()[3:] == [str(PAYLOAD_TYPE[chosen])]
        assert (call.codec, call.rate) == (chosen.lower(), 8000)
        created = await call.wait_for("session.created")
        assert formats(created["session"]) == (fmt(chosen), fmt(chosen))
    finally:
        await call.close()


@pytest.mark.parametrize("offered", [["opus", "PCMU"], ["PCMU", "opus"], ["PCMA", "PCMU", "opus"]],
                         ids=["opus-first", "pcmu-first", "opus-last"])
async def test_an_offer_with_opus_gets_opus_wherever_it_lists_it(relay, offered):
    call = await call_relay(relay.url, codecs=offered)
    try:
        assert (call.codec, call.rate) == ("opus", 48000)
        assert not re.search(r"a=rtpmap:\d+ (PCMU|PCMA)/", call.answer_sdp)
        created = await call.wait_for("session.created")
        assert formats(created["session"]) == (PCM24, PCM24)
        # Audio flows as Opus: the relay's frames arrive as 20 ms at 48 kHz.
        await until(lambda: len(call.audio) >= 5)
        assert {a.size for a in call.audio} == {FRAME}
    finally:
        await call.close()


@pytest.mark.parametrize("offered, mutate", [(["G722"], None), (["G722"], with_telephone_event)],
                         ids=["g722", "g722-and-telephone-event"])
async def test_an_offer_with_no_codec_the_relay_answers_is_a_400_invalid_offer(relay, offered, mutate):
    with pytest.raises(AssertionError, match="relay answered") as failure:
        await call_relay(relay.url, codecs=offered, **({"mutate_offer": mutate} if mutate else {}))
    status, body = re.fullmatch(r"relay answered (\d+): (.*)", str(failure.value), re.S).groups()
    error = json.loads(body)["error"]
    assert int(status) == 400 and set(error) == {"message", "type", "code", "param"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_offer") and error["message"]
    assert relay.calls == {}


# --- pass-through, both ways --------------------------------------------------------------------------------------


async def test_a_spoken_turn_is_echoed_with_g711_on_every_leg(relay, law, sent_upstream):
    call = await call_relay(relay.url, codecs=[law], log_packets=True)
    sent = call.tap_outbound()
    try:
        created = await call.wait_for("session.created")
        assert formats(created["session"]) == (fmt(law), fmt(law))
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
        await call.wait_for("output_audio_buffer.stopped", timeout=20)
        types = call.types()
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
        assert started["response_id"] == done["response"]["id"] and done["response"]["status"] == "completed"
        assert done["response"]["audio"]["output"]["format"] == fmt(law)

        # What the client heard (aiortc's G.711 decoder, 8 kHz) is the simulator's echo of what it said.
        received = call.received()
        assert loud_ms(received, rate=8000)
        _, score = best_alignment(received, HELLO8)
        assert score >= ECHO_CORRELATION, score

        # Upstream: one append per RTP packet, each 160 bytes, holding the packet's payload as it was sent.
        record = relay.simulator.recorder.sessions[-1]
        upstream = appends(record.received)
        assert len(upstream) > 50 and {e["audio_bytes"] for e in upstream} == {FRAME_BYTES}
        upstream_audio = bytes(sent_upstream[record.connection_id])
        sent_audio = b"".join(p.payload for p in sent.sent)
        assert len(upstream_audio) == FRAME_BYTES * len(upstream) and upstream_audio in sent_audio
        assert not sent.dropped

        # Downstream RTP: the law's static payload type, 160-byte payloads, the 8 kHz clock stepping 160 a packet.
        packets = call.packets.log
        assert len(packets) > 100
        assert {p.payload_type for p in packets} == {PAYLOAD_TYPE[law]}
        assert {len(p.payload) for p in packets} == {FRAME_BYTES}
        steps = {((b.sequence_number - a.sequence_number) % 2**16, (b.timestamp - a.timestamp) % 2**32)
                 for a, b in zip(packets, packets[1:])}
        assert steps == {(1, 160)}, steps
        # The reply is in the payloads themselves (decoded here by FFmpeg's G.711 decoder, not the relay's).
        decoded = decode_g711(b"".join(p.payload for p in packets), law)
        _, score = best_alignment(decoded, HELLO8)
        assert score >= ECHO_CORRELATION, score
    finally:
        await call.close()


async def test_a_client_asking_for_pcm_leaves_the_call_on_g711(relay, law):
    call = await call_relay(relay.url, codecs=[law])
    try:
        await call.wait_for("session.created")
        call.send({"type": "session.update", "session": {
            "type": "realtime", "instructions": "Be brief.",
            "audio": {"input": {"format": PCM24}, "output": {"format": PCM24}}}})
        updated = await call.wait_for("session.updated")
        assert updated["session"]["instructions"] == "Be brief."
        assert formats(updated["session"]) == (fmt(law), fmt(law))
        last_update = upstream_session_updates(relay)[-1]
        assert last_update["instructions"] == "Be brief." and formats(last_update) == (fmt(law), fmt(law))

        # A spoken turn still comes back as the same speech: both ways are G.711 at the upstream.
        frames_before, after = len(call.audio), len(call.events)
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
        await call.wait_for("output_audio_buffer.stopped", timeout=20, after=after)
        _, score = best_alignment(heard_since(call, frames_before), HELLO8)
        assert score >= ECHO_CORRELATION, score
        assert {e["audio_bytes"] for e in appends(relay.upstream_received())} == {FRAME_BYTES}

        # A response.create naming PCM output is given the call's format too.
        after = len(call.events)
        call.send(user_says("Hello there."))
        call.send({"type": "response.create", "response": {"audio": {"output": {"format": PCM24}}}})
        done = await call.wait_for("response.done", timeout=20, after=after)
        assert done["response"]["status"] == "completed"
        assert done["response"]["audio"]["output"]["format"] == fmt(law)
        (create,) = [e for e in relay.upstream_received() if e.get("type") == "response.create"]
        assert create["response"]["audio"]["output"]["format"] == fmt(law)
        await call.wait_for("output_audio_buffer.stopped", timeout=20, after=after)
    finally:
        await call.close()


# --- barge-in and truncation --------------------------------------------------------------------------------------


async def test_barge_in_flushes_and_truncates_to_what_the_client_heard(relay, law):
    call = await call_relay(relay.url, codecs=[law])
    try:
        await call.wait_for("session.created")
        call.mic.say(silence48(400))
        call.mic.say(tone(1500))  # a steady tone: its cut point can be found to a few ms
        call.mic.say(silence48(600))
        started = await call.wait_for("output_audio_buffer.started", timeout=20)
        await asyncio.sleep(1.0)  # 300 ms of prefix padding, then ~700 ms of the echoed tone
        audio_before = len(call.audio)
        call.mic.say(tone(600, hz=660))  # the user talks over it
        cleared = await call.wait_for("output_audio_buffer.cleared", timeout=10)
        assert cleared["response_id"] == started["response_id"]
        truncated = await call.wait_for("relay.item.truncated", timeout=10)
        await asyncio.sleep(0.5)  # let the client's jitter buffer release what was sent before the flush

        truncates = [e for e in relay.upstream_received() if e.get("type") == "conversation.item.truncate"]
        assert len(truncates) == 1
        audio_end_ms = truncates[0]["audio_end_ms"]
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (truncates[0]["item_id"], audio_end_ms)

        echo = call.received()[: sum(len(a) for a in call.audio[:audio_before]) + 8 * 2000]
        # The echoed item is 300 ms of prefix padding, then the tone: the tone heard says where it was cut.
        heard_ms = 300 + loud_span_ms(echo, rate=8000)
        assert abs(audio_end_ms - heard_ms) <= PT_MS, (audio_end_ms, heard_ms)
        assert 300 < audio_end_ms < 300 + 1500  # cut inside the tone, not after it
    finally:
        await call.close()


# --- loss ---------------------------------------------------------------------------------------------------------


def sweep(ms: int, low_hz: float = 300.0, high_hz: float = 1500.0) -> np.ndarray:
    """A -20 dBFS sweep at 48 kHz: loud throughout, and no two of its 20 ms packets alike (a steady tone repeats
    every few packets), so each packet can be found again upstream."""
    t = np.arange(ms * 48) / 48000
    phase = 2 * np.pi * (low_hz * t + (high_hz - low_hz) * t**2 / (2 * t[-1]))
    return (np.sin(phase) * 32768 * 0.1 * np.sqrt(2)).astype("<i2")


async def test_lost_client_packets_are_filled_so_the_upstream_clock_stays_true(relay, law, sent_upstream):
    """Two identical turns, the second with 8 of the client's packets lost inside its sound: where the upstream's
    VAD puts the sound's start and end, against the client's own timeline, moves by at most a frame or two. (Were
    the losses not filled, the end would come 160 ms early on the upstream's clock.)"""
    call = await call_relay(relay.url, codecs=[law])
    out = call.tap_outbound()
    try:
        await call.wait_for("session.created")
        upstream_audio = sent_upstream.setdefault(relay.simulator.recorder.sessions[-1].connection_id, bytearray())
        await until(lambda: out.count > 10)
        offsets = []
        for lossy in (False, True):
            after = len(call.events)
            call.mic.say(silence48(400))
            start = call.mic.position()
            call.mic.say(sweep(1500))
            end = call.mic.position()
            call.mic.say(silence48(1000))
            if lossy:
                upstream_from = len(upstream_audio) // FRAME_BYTES  # (the clean turn's audio is alike: left out)
                # Packets are numbered as the microphone's frames (to one frame): lose 8, 120 ms apart, from
                # 200 ms into the sound.
                out.drop(after=(start - call.mic.sent_samples) // FRAME + 10, every=6, count=8)
            speech_started = await call.wait_for("input_audio_buffer.speech_started", timeout=20, after=after)
            speech_stopped = await call.wait_for("input_audio_buffer.speech_stopped", timeout=20, after=after)
            offsets.append((start / 48 - speech_started["audio_start_ms"], end / 48 - speech_stopped["audio_end_ms"]))
            await call.wait_for("output_audio_buffer.stopped", timeout=20, after=after)
        assert len(out.dropped) == 8 and out.drops_pending == 0
        assert all(np.abs(decode_g711(p.payload, law)).max() > 1000 for p in out.dropped)  # inside the sound
        (clean_start, clean_end), (lossy_start, lossy_end) = offsets
        assert abs(lossy_start - clean_start) <= 2 * PT_MS, offsets
        assert abs(lossy_end - clean_end) <= 2 * PT_MS, offsets

        # Upstream, packet by packet around the losses: each sent payload as it was, each lost one a frame of the
        # law's silence, in sequence order.
        silent = bytes([0xFF if law == "PCMU" else 0xD5]) * FRAME_BYTES
        audio = bytes(upstream_audio)
        frames = [audio[i:i + FRAME_BYTES] for i in range(upstream_from * FRAME_BYTES, len(audio),
                                                                   FRAME_BYTES)]
        by_sequence = {p.sequence_number: p.payload for p in out.sent} | {p.sequence_number: silent for p in out.dropped}
        first, last = out.dropped[0].sequence_number, out.dropped[-1].sequence_number
        anchor = by_sequence[(first - 1) % 2**16]  # the packet before the first loss: one of the sound's
        assert frames.count(anchor) == 1
        at = frames.index(anchor) - 9
        span = (last - first) % 2**16 + 20
        expected = [by_sequence[(first - 10 + k) % 2**16] for k in range(span)]
        assert frames[at:at + span] == expected
    finally:
        await call.close()


# --- recordings, metrics ------------------------------------------------------------------------------------------


async def test_a_recorded_g711_call_is_an_8khz_stereo_wav_of_both_sides(simulator, tmp_path, law):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime", recordings_dir=str(tmp_path)))
    try:
        call = await call_relay(url, codecs=[law])
        try:
            await call.wait_for("session.created")
            call.mic.say(silence48(300))
            call.mic.say(tone(1000))
            call.mic.say(silence48(1200))
            await call.wait_for("output_audio_buffer.stopped", timeout=20)
        finally:
            await call.close()
        await _ended(Relay(app, url, simulator), call.call_id)
    finally:
        await runner.cleanup()

    with wave.open(str(tmp_path / f"{call.call_id}.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        stereo = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    user, model = stereo[0::2], stereo[1::2]
    # The user's side: the tone, decoded (not G.711 bytes taken for PCM), as long as it was said.
    assert abs(loud_span_ms(user, rate=8000) - 1000) <= 2 * PT_MS, loud_span_ms(user, rate=8000)
    _, score = best_alignment(user, tone(1000, rate=8000))
    assert score >= 0.9, score
    # The model's side: its echo of the tone, after the user spoke.
    assert abs(loud_span_ms(model, rate=8000) - 1000) <= 2 * PT_MS, loud_span_ms(model, rate=8000)
    _, score = best_alignment(model, tone(1000, rate=8000))
    assert score >= 0.9, score
    assert loud_ms(model, rate=8000)[0] > loud_ms(user, rate=8000)[-1]


async def test_metrics_count_calls_by_codec(relay, law):
    async with aiohttp.ClientSession() as http:
        before = await scrape(http, relay.url)
        call = await call_relay(relay.url, codecs=[law])
        try:
            await call.wait_for("session.created")
            after = before
            async with asyncio.timeout(10):  # counted at the answer; scraped until it shows
                while value(after, "relay_calls_by_codec_total", codec=law.lower()) == value(
                        before, "relay_calls_by_codec_total", codec=law.lower()):
                    await asyncio.sleep(0.1)
                    after = await scrape(http, relay.url)
        finally:
            await call.close()

    def grew(codec: str) -> float:
        return value(after, "relay_calls_by_codec_total", codec=codec) - value(
            before, "relay_calls_by_codec_total", codec=codec)

    assert {codec: grew(codec) for codec in ("opus", "pcmu", "pcma")} == {
        codec: float(codec == law.lower()) for codec in ("opus", "pcmu", "pcma")}


# --- the sideband, reconnects -------------------------------------------------------------------------------------


async def test_a_backend_on_the_sideband_sees_and_steers_a_g711_call(simulator, law):
    async with relay_logged(env=relay_env(simulator, RELAY_MAX_BACKENDS_PER_CALL="1")) as served:
        async with sdk(served.base, KEY) as app:
            call = await call_relay(served.base, post=offer_through(app), codecs=[law])
        try:
            created = await call.wait_for("session.created")
            assert formats(created["session"]) == (fmt(law), fmt(law)) and call.rate == 8000
            async with sdk(served.base, KEY) as client, client.realtime.connect(call_id=call.call_id) as connection:
                backend = Backend(connection)
                # The backend's session.update naming PCM: applied, but the call stays on its G.711 format.
                await connection.session.update(session={
                    "type": "realtime", "instructions": "The backend's.",
                    "audio": {"input": {"format": PCM24}, "output": {"format": PCM24}}})
                updated = await call.wait_for(lambda e: e["type"] == "session.updated"
                                              and e["session"].get("instructions") == "The backend's.")
                assert formats(updated["session"]) == (fmt(law), fmt(law))
                seen = await backend.wait_for(lambda e: e["type"] == "session.updated"
                                              and e["session"].get("instructions") == "The backend's.")
                assert formats(seen["session"]) == (fmt(law), fmt(law))
                # The peer's spoken turn, as the backend sees it; the peer hears the reply.
                frames_before = len(call.audio)
                call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
                for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "output_audio_buffer.started", "response.done", "output_audio_buffer.stopped"):
                    await backend.wait_for(kind)
                await call.wait_for("output_audio_buffer.stopped", timeout=20)
                done = await backend.wait_for("response.done")
                assert done["response"]["audio"]["output"]["format"] == fmt(law)
                _, score = best_alignment(heard_since(call, frames_before), HELLO8)
                assert score >= ECHO_CORRELATION, score
        finally:
            await call.close()


async def test_after_the_upstream_drops_the_next_turn_still_works_on_g711(simulator, law):
    simulator.reconfigure(close_after_event_type="response.output_audio_transcript.delta", close_abruptly=True)
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime",
                                                   upstream_retry_backoff_s="0.05", client_session_fields="*"))
    call = await call_relay(url, codecs=[law])
    simulator.reconfigure(close_after_event_type=None)  # the sessions that follow are sound
    relay = Relay(app, url, simulator)
    try:
        await call.wait_for("session.created")
        call.send(user_says("My name is Ada."))
        call.send({"type": "response.create"})
        await call.wait_for("relay.upstream.reconnecting", timeout=10)
        reconnected = await call.wait_for("relay.upstream.reconnected", timeout=10)
        assert reconnected["attempt"] == 1
        assert len(simulator.recorder.sessions) == 2
        # The new session is on the call's G.711 format both ways, like the first.
        assert formats(upstream_session_updates(relay)[0]) == (fmt(law), fmt(law))

        # The next turn, spoken, works on the new session, in G.711 both ways.
        frames_before, after = len(call.audio), len(call.events)
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
        done = await call.wait_for("response.done", timeout=20, after=after)
        assert done["response"]["status"] == "completed"
        assert done["response"]["audio"]["output"]["format"] == fmt(law)
        # (The reply the dropped session took away played to its end after the reconnection: wait for this one's.)
        await call.wait_for("output_audio_buffer.stopped", timeout=20, after=call.events.index(done))
        _, score = best_alignment(heard_since(call, frames_before), HELLO8)
        assert score >= ECHO_CORRELATION, score
        assert {e["audio_bytes"] for e in appends(relay.upstream_received())} == {FRAME_BYTES}
        assert "error" not in call.types() and app[CALLS][call.call_id].upstream.reconnects == 1
    finally:
        await call.close()
        await runner.cleanup()
