"""The simulator's core on a virtual clock: no sockets, no sleeps."""

from __future__ import annotations

import base64
import json

from relay.simulator.config import SimConfig
from relay.simulator.session import VAD_IDLE_KEEP_MS, SimSession
from tests.helpers import BYTES_PER_MS, load_pcm, silence

HELLO = load_pcm("speech_hello_24k.wav")


def send(sim: SimSession, now: float, **event) -> list[dict]:
    sim.receive(json.dumps(event), now)
    return sim.take_outgoing()


def append(session: SimSession, pcm: bytes, start: float) -> tuple[list[dict], float]:
    """Append `pcm` in 20 ms chunks at real-time pace from `start`; return the events and the end time."""
    out, now = [], start
    for i in range(0, len(pcm), 20 * BYTES_PER_MS):
        out += send(session, now, type="input_audio_buffer.append", audio=base64.b64encode(pcm[i : i + 960]).decode())
        now += 0.02
    return out, now


def run_until_idle(session: SimSession, now: float, limit: float = 60.0) -> list[tuple[float, dict]]:
    """Advance the virtual clock through every timer (up to `limit` s); events with the time they went out."""
    timed = []
    while (due := session.next_deadline()) is not None and due < now + limit:
        session.advance(due)
        timed += [(due, e) for e in session.take_outgoing()]
    return timed


def manual_session(config: SimConfig = SimConfig()) -> SimSession:
    session = SimSession(config, "gpt-realtime", now=0.0, wall_time=1_000_000.0)
    session.take_outgoing()
    send(session, 0.0, type="session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
    return session


def test_defaults_answer_after_a_few_hundred_ms_then_faster_than_real_time():
    session = manual_session()
    append(session, HELLO, 0.0)
    send(session, 1.0, type="input_audio_buffer.commit")
    created = send(session, 1.0, type="response.create")
    assert created[0]["type"] == "response.created"
    timed = [(t, e) for t, e in run_until_idle(session, 1.0) if e["type"] == "response.output_audio.delta"]
    first, last = timed[0][0], timed[-1][0]
    assert abs(first - 1.0 - 0.300) < 1e-9
    audio_s = len(HELLO) / BYTES_PER_MS / 1000
    assert last - first < audio_s / 3  # generated at several times real time (default: 4x)


def test_expiry_at_sixty_minutes_on_the_virtual_clock():
    session = SimSession(SimConfig(), "gpt-realtime", now=0.0, wall_time=1_000_000.0)
    assert session.take_outgoing()[0]["session"]["expires_at"] == 1_000_000 + 3600
    assert session.next_deadline() == 3600.0
    session.advance(3599.9)
    assert session.take_outgoing() == [] and session.closing is None
    session.advance(3600.0)
    (error,) = session.take_outgoing()
    assert error["error"]["code"] == "session_expired"
    assert session.closing == (1000, "session expired")


def test_barge_in_on_the_virtual_clock_cancels_at_the_moment_speech_starts():
    session = SimSession(SimConfig(speed=1.0), "gpt-realtime", now=0.0)
    session.take_outgoing()
    turn, now = append(session, silence(300) + HELLO + silence(600), 0.0)
    assert "input_audio_buffer.speech_stopped" in [e["type"] for e in turn]
    timed = run_until_idle(session, now, limit=0.5)  # half a second of the reply goes out
    assert any(e["type"] == "response.output_audio.delta" for _, e in timed)
    out, _ = append(session, HELLO[: 200 * BYTES_PER_MS], now + 0.5)
    types = [e["type"] for e in out]
    assert types.index("input_audio_buffer.speech_started") < types.index("response.done")
    done = next(e for e in out if e["type"] == "response.done")
    assert done["response"]["status_details"]["reason"] == "turn_detected"


def test_idle_vad_buffer_and_manual_buffer_stay_bounded():
    session = SimSession(SimConfig(max_buffer_s=2.0), "gpt-realtime", now=0.0)
    append(session, silence(30_000), 0.0)  # 30 s of silence with server VAD on
    assert len(session._buffer) <= VAD_IDLE_KEEP_MS * BYTES_PER_MS
    manual = manual_session(SimConfig(max_buffer_s=2.0))
    append(manual, silence(10_000), 0.0)
    assert len(manual._buffer) == 2000 * BYTES_PER_MS


def test_a_deleted_item_gets_no_late_transcription():
    session = manual_session()
    send(session, 0.0, type="session.update", session={"type": "realtime", "audio": {"input": {"transcription": {"model": "m"}}}})
    append(session, HELLO, 0.0)
    out = send(session, 3.0, type="input_audio_buffer.commit")
    item_id = next(e for e in out if e["type"] == "input_audio_buffer.committed")["item_id"]
    send(session, 3.0, type="conversation.item.delete", item_id=item_id)
    assert not [e for _, e in run_until_idle(session, 3.0, limit=5) if "transcription" in e["type"]]
