"""The simulator in G.711 (`audio/pcmu`, `audio/pcma`), on a virtual clock: it hears 8 kHz G.711 as it hears 24 kHz
PCM (the same turns, at the same times) and answers in the session's output format, 8 bytes a millisecond.

Every event it emits is checked against the official GA types (`take`)."""

from __future__ import annotations

import base64
import math

import av
import numpy as np
import pytest

from relay.audio import g711
from relay.simulator import voice
from relay.simulator.config import SimConfig
from relay.simulator.server import SessionRecord
from relay.simulator.session import SimSession
from tests.helpers import BYTES_PER_MS, load_pcm, silence
from tests.unit.test_sim_session_robustness import b64, errors, new_session, run_until_idle, send, take, update

LAWS = [g711.PCMU, g711.PCMA]
HELLO = load_pcm("speech_hello_24k.wav")
SPEECH = silence(300) + HELLO + silence(800)  # one turn, 24 kHz PCM16
G711_BYTES_PER_MS = 8


def to_8k(pcm24: bytes) -> bytes:
    """24 kHz PCM16 -> 8 kHz, by ffmpeg's resampler (not the one under test), one sample for every three."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm24, "<i2").reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 24000
    out = b"".join(f.to_ndarray().tobytes() for f in [*resampler.resample(frame), *resampler.resample(None)])
    want = len(pcm24) // 6 * 2
    return out[:want] + bytes(max(0, want - len(out)))


def wire(pcm24: bytes, law: str) -> bytes:
    return g711.encode(to_8k(pcm24), law)


def formats(sim: SimSession, law_in: str, law_out: str | None = None, **audio_input) -> list[dict]:
    out = update(sim, audio={"input": {"format": {"type": law_in}, **audio_input},
                             "output": {"format": {"type": law_out or law_in}}})
    assert out[0]["type"] == "session.updated", out
    return out


def append(sim: SimSession, data: bytes, start: float, chunk: int = g711.FRAME_BYTES) -> tuple[list[dict], float]:
    """Append `data` in 20 ms chunks (160 bytes of G.711, 960 of PCM: pass `chunk`) at real-time pace."""
    out, now = [], start
    for i in range(0, len(data), chunk):
        out += send(sim, now, type="input_audio_buffer.append", audio=b64(data[i : i + chunk]))
        now += 0.02
    return out, now


def of(events: list[dict], event_type: str) -> list[dict]:
    return [e for e in events if e["type"] == event_type]


def deltas(events: list[dict]) -> list[bytes]:
    return [base64.b64decode(e["delta"]) for e in of(events, "response.output_audio.delta")]


def frame_levels(pcm: bytes, rate: int, ms: int = 20) -> np.ndarray:
    """dBFS of each `ms` of PCM16."""
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    n = rate * ms // 1000
    frames = x[: len(x) // n * n].reshape(-1, n)
    return 10 * np.log10(np.mean(frames * frames, axis=1) / 32768**2 + 1e-12)


def turn(sim: SimSession, data: bytes, chunk: int = g711.FRAME_BYTES) -> tuple[dict, dict, list[dict]]:
    """One spoken turn: (speech_started, speech_stopped, every event up to the reply's end)."""
    out, now = append(sim, data, 0.0, chunk)
    out += run_until_idle(sim, now)
    (started,) = of(out, "input_audio_buffer.speech_started")
    (stopped,) = of(out, "input_audio_buffer.speech_stopped")
    return started, stopped, out


@pytest.mark.parametrize("law", LAWS)
def test_session_update_takes_g711_either_way_and_reports_it(law):
    sim = new_session()
    (updated,) = formats(sim, law)
    assert updated["session"]["audio"]["input"]["format"] == updated["session"]["audio"]["output"]["format"] == {"type": law}
    (updated,) = update(sim, audio={"input": {"format": {"type": "audio/pcm"}}})  # back to PCM in, G.711 still out
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert updated["session"]["audio"]["output"]["format"] == {"type": law}
    # Still refused: a format the API does not have, PCM at another rate, a rate for G.711.
    for fmt, param in [({"type": "audio/opus"}, "session.audio.output.format"),
                       ({"type": "audio/pcm", "rate": 16000}, "session.audio.output.format.rate"),
                       ({"type": law, "rate": 8000}, "session.audio.output.format.rate")]:
        assert [e["param"] for e in errors(update(sim, audio={"output": {"format": fmt}}))] == [param]
    assert sim.session["audio"]["output"]["format"] == {"type": law}


@pytest.mark.parametrize("law", LAWS)
def test_g711_speech_makes_the_turn_pcm_makes_and_the_echo_comes_back_in_g711(law):
    pcm_started, pcm_stopped, _ = turn(new_session(), SPEECH, chunk=20 * BYTES_PER_MS)
    sim = new_session()
    formats(sim, law)
    speech = wire(SPEECH, law)
    started, stopped, out = turn(sim, speech)
    assert abs(started["audio_start_ms"] - pcm_started["audio_start_ms"]) <= 20
    assert abs(stopped["audio_end_ms"] - pcm_stopped["audio_end_ms"]) <= 20
    heard_ms = stopped["audio_end_ms"] - started["audio_start_ms"]

    response = of(out, "response.done")[0]["response"]
    assert response["status"] == "completed"
    assert of(out, "response.created")[0]["response"]["audio"]["output"]["format"] == {"type": law}
    assert response["audio"]["output"]["format"] == {"type": law}
    assert of(out, "response.output_audio_transcript.done")[0]["transcript"] == voice.echo_transcript(heard_ms)

    pieces = deltas(out)
    ms_per_delta = SimConfig().delta_ms
    assert all(len(p) == ms_per_delta * G711_BYTES_PER_MS for p in pieces[:-1])  # whole 20 ms frames, as in PCM
    assert all(len(p) % g711.FRAME_BYTES == 0 for p in pieces[:-1])
    reply = b"".join(pieces)
    assert len(reply) == heard_ms * G711_BYTES_PER_MS
    # What comes back is what was heard: loud where the speech was loud, quiet where it was quiet.
    heard = g711.decode(speech[started["audio_start_ms"] * 8 : stopped["audio_end_ms"] * 8], law)
    said = g711.decode(reply, law)
    expected, got = frame_levels(heard, 8000), frame_levels(said, 8000)
    loud = expected > -40
    assert loud.sum() > 20 and np.abs(got[loud] - expected[loud]).max() < 2.0
    assert np.all(got[expected < -70] < -60)
    a = np.frombuffer(heard, "<i2").astype(float)
    b = np.frombuffer(said, "<i2").astype(float)
    assert np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)) > 0.95  # the same waveform, not merely as loud


@pytest.mark.parametrize("law", LAWS)
def test_a_g711_reply_truncates_by_milliseconds_and_its_retrieved_audio_is_g711(law):
    sim = new_session()
    formats(sim, law)
    _, _, out = turn(sim, wire(SPEECH, law))
    item_id = of(out, "response.done")[0]["response"]["output"][0]["id"]
    (retrieved,) = send(sim, 10.0, type="conversation.item.retrieve", item_id=item_id)
    full = base64.b64decode(retrieved["item"]["content"][0]["audio"])
    assert full == b"".join(deltas(out))  # the same bytes the deltas carried
    (truncated,) = send(sim, 10.0, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=500)
    assert truncated["audio_end_ms"] == 500
    (retrieved,) = send(sim, 10.0, type="conversation.item.retrieve", item_id=item_id)
    part = retrieved["item"]["content"][0]
    assert part["transcript"] == voice.echo_transcript(500)
    cut = base64.b64decode(part["audio"])
    assert len(cut) == 500 * G711_BYTES_PER_MS
    assert cut[:-16] == full[: 500 * G711_BYTES_PER_MS - 16]  # the last 2 ms are filtered without what followed


@pytest.mark.parametrize("law", LAWS)
def test_the_user_item_retrieved_is_g711_of_what_was_heard(law):
    sim = new_session()
    formats(sim, law)
    speech = wire(SPEECH, law)
    started, stopped, out = turn(sim, speech)
    user_item = of(out, "input_audio_buffer.committed")[0]["item_id"]
    (retrieved,) = send(sim, 10.0, type="conversation.item.retrieve", item_id=user_item)
    audio = base64.b64decode(retrieved["item"]["content"][0]["audio"])
    heard = speech[started["audio_start_ms"] * 8 : stopped["audio_end_ms"] * 8]
    assert len(audio) == len(heard)
    expected, got = frame_levels(g711.decode(heard, law), 8000), frame_levels(g711.decode(audio, law), 8000)
    assert np.abs(got[expected > -40] - expected[expected > -40]).max() < 2.0


@pytest.mark.parametrize("law", LAWS)
def test_a_text_reply_speaks_its_synthetic_voice_in_g711(law):
    sim = new_session(vad=False)
    formats(sim, law)
    send(sim, 0.0, type="conversation.item.create",
         item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]})
    send(sim, 0.0, type="response.create")
    out = run_until_idle(sim, 0.0)
    said = of(out, "response.output_audio_transcript.done")[0]["transcript"]
    assert said == "You said: hello there"
    reply = b"".join(deltas(out))
    assert len(reply) == voice.audio_ms(len(voice.synthesize(said))) * G711_BYTES_PER_MS  # 4 words of 280 ms
    levels = frame_levels(g711.decode(reply, law), 8000, ms=10)
    for word in range(4):  # 220 ms of voice, then 60 ms of silence
        assert levels[word * 28 + 8 : word * 28 + 14].min() > -25  # the middle of the word
        assert levels[word * 28 + 23 : word * 28 + 27].max() < -45  # the gap
    assert of(out, "response.done")[0]["response"]["audio"]["output"]["format"] == {"type": law}


@pytest.mark.parametrize("law", LAWS)
def test_echo_appends_with_the_same_format_sends_the_bytes_back_untouched(law):
    sim = new_session(SimConfig(echo_appends=True))
    formats(sim, law)
    chunks = [wire(HELLO[:960], law), bytes(range(256)), b"\x01", bytes([g711.SILENCE[law]]) * 161]  # any length
    out = []
    for chunk in chunks:
        out += send(sim, 0.0, type="input_audio_buffer.append", audio=b64(chunk))
    assert deltas(out) == chunks
    assert of(out, "response.created")[0]["response"]["audio"]["output"]["format"] == {"type": law}


def test_echo_appends_converts_between_different_formats():
    frame = wire(HELLO[24000:24960], g711.PCMU)  # 20 ms of speech
    sim = new_session(SimConfig(echo_appends=True))
    formats(sim, g711.PCMU, g711.PCMA)
    (back,) = deltas(send(sim, 0.0, type="input_audio_buffer.append", audio=b64(frame)))
    assert back == g711.encode(g711.decode(frame, g711.PCMU), g711.PCMA)  # law to law, no resampling

    sim = new_session(SimConfig(echo_appends=True))
    update(sim, audio={"output": {"format": {"type": g711.PCMU}}})
    (back,) = deltas(send(sim, 0.0, type="input_audio_buffer.append", audio=b64(HELLO[24000:24960])))
    assert len(back) == g711.FRAME_BYTES

    sim = new_session(SimConfig(echo_appends=True))
    update(sim, audio={"input": {"format": {"type": g711.PCMA}}})
    (back,) = deltas(send(sim, 0.0, type="input_audio_buffer.append", audio=b64(frame)))
    assert len(back) == 20 * BYTES_PER_MS


def test_g711_appends_of_any_length_are_taken_pcm16_still_needs_an_even_one():
    sim = new_session(vad=False)
    assert errors(send(sim, 0.0, type="input_audio_buffer.append", audio=b64(bytes(3))))[0]["code"] == "invalid_value"
    formats(sim, g711.PCMU)
    assert send(sim, 0.0, type="input_audio_buffer.append", audio=b64(bytes([0xFF]) * 801)) == []
    assert len(sim._buffer) == 801 * 6  # 100.125 ms, in 24 kHz PCM16


def test_a_format_change_applies_to_the_audio_after_it():
    """Half a second of PCM, then half a second of mu-law: one second in the buffer; the reply is the same second,
    in the output format of when it was created."""
    sim = new_session(vad=False)
    update(sim, audio={"output": {"format": {"type": g711.PCMA}}})
    _, now = append(sim, HELLO[:500 * BYTES_PER_MS], 0.0, chunk=20 * BYTES_PER_MS)
    formats(sim, g711.PCMU, g711.PCMA)
    _, now = append(sim, wire(HELLO[500 * BYTES_PER_MS : 1000 * BYTES_PER_MS], g711.PCMU), now)
    send(sim, now, type="input_audio_buffer.commit")
    created = send(sim, now, type="response.create")
    update(sim, now, audio={"output": {"format": {"type": "audio/pcm"}}})  # too late for this response
    out = run_until_idle(sim, now)
    assert of(out, "response.output_audio_transcript.done")[0]["transcript"] == voice.echo_transcript(1000)
    assert created[0]["response"]["audio"]["output"]["format"] == {"type": g711.PCMA}
    assert len(b"".join(deltas(out))) == 1000 * G711_BYTES_PER_MS


def test_response_create_may_name_its_own_output_format():
    sim = new_session(vad=False)
    formats(sim, g711.PCMU)
    send(sim, 0.0, type="conversation.item.create",
         item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
    created = send(sim, 0.0, type="response.create", response={"audio": {"output": {"format": {"type": "audio/pcm"}}}})
    assert created[0]["response"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    out = run_until_idle(sim, 0.0)
    said = of(out, "response.output_audio_transcript.done")[0]["transcript"]
    assert b"".join(deltas(out)) == voice.synthesize(said)  # PCM as generated, untouched


def test_item_audio_a_client_creates_is_in_the_input_format():
    sim = new_session(vad=False)
    formats(sim, g711.PCMA, g711.PCMU)
    audio = wire(HELLO[: 1000 * BYTES_PER_MS], g711.PCMA)
    out = send(sim, 0.0, type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": b64(audio)}]})
    item_id = of(out, "conversation.item.done")[0]["item"]["id"]
    assert len(sim.items[-1].audio) == 1000 * BYTES_PER_MS
    (retrieved,) = send(sim, 0.0, type="conversation.item.retrieve", item_id=item_id)
    back = base64.b64decode(retrieved["item"]["content"][0]["audio"])  # in the output format: mu-law
    assert len(back) == len(audio)
    a = np.frombuffer(g711.decode(audio, g711.PCMA), "<i2").astype(float)
    b = np.frombuffer(g711.decode(back, g711.PCMU), "<i2").astype(float)
    assert np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)) > 0.95


def test_the_record_keeps_g711_appends_as_the_session_hears_them():
    sim = new_session(vad=False)
    formats(sim, g711.PCMU)
    take(sim)
    record = SessionRecord("conn_x", "gpt-realtime", {}, 0.0, max_audio_bytes=10**6)
    frame = wire(HELLO[24000:24960], g711.PCMU)
    record.on_received('{"type": "input_audio_buffer.append", "audio": "%s"}' % b64(frame), sim.input_pcm)
    assert bytes(record.input_audio) == g711.upsample_to_24k(g711.decode(frame, g711.PCMU))
    assert record.received[-1]["audio_bytes"] == g711.FRAME_BYTES
    assert record.summary()["input_audio_ms"] == 20
