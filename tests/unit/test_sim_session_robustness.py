"""Regression tests for the simulator core's robustness fixes, on a virtual clock (no sockets, no sleeps).

Every event the core emits here is checked against the official GA types, as the WebSocket helpers do.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from relay.simulator.config import KnobError, SimConfig
from relay.simulator.session import SimSession, tokens
from tests.conftest import FAST
from tests.helpers import BYTES_PER_MS, silence
from tests.oracle import check_server_event

# --- helpers -------------------------------------------------------------------------------------------------------


def tone(ms: int) -> bytes:
    """A loud 440 Hz tone (about -13 dBFS): speech to the energy VAD."""
    t = np.arange(ms * 24) / 24000
    return (np.sin(2 * np.pi * 440 * t) * 0.3 * 32767).astype("<i2").tobytes()


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def take(sim: SimSession) -> list[dict]:
    out = sim.take_outgoing()
    for event in out:
        check_server_event(event)
    return out


def send(sim: SimSession, now: float, **event) -> list[dict]:
    sim.receive(json.dumps(event), now)
    return take(sim)


def send_raw(sim: SimSession, text: str, now: float = 0.0) -> list[dict]:
    sim.receive(text, now)
    return take(sim)


def update(sim: SimSession, now: float = 0.0, **session) -> list[dict]:
    return send(sim, now, type="session.update", session={"type": "realtime", **session})


def append(sim: SimSession, pcm: bytes, start: float) -> tuple[list[dict], float]:
    """Append `pcm` in 20 ms chunks at real-time pace from `start`; return the events and the end time."""
    out, now = [], start
    for i in range(0, len(pcm), 20 * BYTES_PER_MS):
        out += send(sim, now, type="input_audio_buffer.append", audio=b64(pcm[i : i + 20 * BYTES_PER_MS]))
        now += 0.02
    return out, now


def run_until_idle(sim: SimSession, now: float, limit: float = 60.0) -> list[dict]:
    out = []
    while (due := sim.next_deadline()) is not None and due < now + limit:
        sim.advance(due)
        out += take(sim)
    return out


def new_session(config: SimConfig = SimConfig(), vad: bool = True) -> SimSession:
    sim = SimSession(config, "gpt-realtime", now=0.0, wall_time=1_000_000.0)
    take(sim)
    if not vad:
        update(sim, audio={"input": {"turn_detection": None}})
    return sim


def user_text(text: str, item_id: str | None = None) -> dict:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return {"type": "conversation.item.create", "item": {"id": item_id, **item} if item_id else item}


def of_type(events: list[dict], event_type: str) -> list[dict]:
    return [e for e in events if e["type"] == event_type]


def errors(events: list[dict]) -> list[dict]:
    return [e["error"] for e in of_type(events, "error")]


def nested(path: str, value) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}"""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


# --- 2. explicit null in session.update ------------------------------------------------------------------------------

NOT_NULLABLE = [
    ("audio", {"audio": None}),
    ("audio.input", {"audio": {"input": None}}),
    ("audio.output", {"audio": {"output": None}}),
    ("audio.input.format", {"audio": {"input": {"format": None}}}),
    ("output_modalities", {"output_modalities": None}),
    ("max_output_tokens", {"max_output_tokens": None}),
    ("tools", {"tools": None}),
    *(
        (f"audio.input.turn_detection.{key}", nested("audio.input.turn_detection", {"type": "server_vad", key: None}))
        for key in ("threshold", "prefix_padding_ms", "silence_duration_ms")
    ),
]


@pytest.mark.parametrize("path, change", NOT_NULLABLE, ids=[p for p, _ in NOT_NULLABLE])
def test_null_for_a_field_that_needs_a_value_is_invalid_type_and_changes_nothing(path, change):
    sim = new_session()
    before = json.dumps(sim.session)
    out = update(sim, **change)
    assert [(e["code"], e["param"]) for e in errors(out)] == [("invalid_type", f"session.{path}")]
    assert not of_type(out, "session.updated")
    assert json.dumps(sim.session) == before
    # The session still works.
    assert of_type(update(sim, instructions="still here"), "session.updated")[0]["session"]["instructions"] == "still here"


NULLABLE = [
    ("audio.input.turn_detection", {"type": "server_vad"}),
    ("audio.input.transcription", {"model": "whisper-1"}),
    ("audio.input.noise_reduction", {"type": "near_field"}),
    ("tracing", "auto"),
]


@pytest.mark.parametrize("path, value", NULLABLE, ids=[p for p, _ in NULLABLE])
def test_null_for_a_nullable_field_is_accepted(path, value):
    sim = new_session()
    assert of_type(update(sim, **nested(path, value)), "session.updated")
    (updated,) = of_type(update(sim, **nested(path, None)), "session.updated")
    session = updated["session"]
    for key in path.split("."):
        session = session[key]
    assert session is None


# --- 3. a deeply nested JSON object inside a text message -----------------------------------------------------------


def test_a_message_holding_deeply_nested_json_gets_a_call_with_empty_arguments():
    sim = new_session(vad=False)
    update(sim, tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}])
    send(sim, 0.0, **user_text('{"a":' * 5000 + " lookup"))
    out = send(sim, 0.0, type="response.create") + run_until_idle(sim, 0.0)
    assert errors(out) == []
    (done,) = of_type(out, "response.done")
    assert done["response"]["status"] == "completed"
    (call,) = done["response"]["output"]
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "lookup", "{}")


# --- 4. an unexpected exception in a handler costs one server_error, not the session --------------------------------


def test_a_handler_that_raises_yields_server_error_and_the_session_goes_on(monkeypatch):
    sim = new_session()

    def broken(event):
        raise RuntimeError("defect")

    monkeypatch.setattr(sim, "_on_conversation_item_retrieve", broken)
    out = send(sim, 0.0, type="conversation.item.retrieve", item_id="item_x", event_id="evt_boom")
    assert [(e["type"], e["code"], e["event_id"]) for e in errors(out)] == [("server_error", "server_error", "evt_boom")]
    assert of_type(update(sim, instructions="after"), "session.updated")[0]["session"]["instructions"] == "after"


# --- 5. knob ranges ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knob", [{"delta_ms": 0}, {"speed": 0}, {"speed": float("nan")}, {"max_session_s": float("inf")}, {"close_code": 99999}],
    ids=str,
)
def test_out_of_range_knobs_raise_knob_error(knob):
    with pytest.raises(KnobError):
        SimConfig(**knob)


# --- 7. bounded conversation memory ---------------------------------------------------------------------------------


def test_max_items_keeps_only_the_newest_items():
    sim = new_session(SimConfig(max_items=5), vad=False)
    for i in range(20):
        send(sim, 0.0, **user_text(f"message {i}", f"item_{i:02d}"))
    assert [item.id for item in sim.items] == [f"item_{i:02d}" for i in range(15, 20)]


def test_conversation_audio_beyond_the_cap_evicts_the_oldest_audio_items():
    sim = new_session(SimConfig(max_conversation_audio_s=1.0), vad=False)
    for i in range(5):  # 400 ms each: only two fit in 1 s
        out = send(sim, 0.0, type="conversation.item.create", item={
            "id": f"item_a{i}", "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": b64(tone(400))}]})
        assert not errors(out)
    assert [item.id for item in sim.items] == ["item_a3", "item_a4"]
    assert sum(len(item.audio) for item in sim.items) == 800 * BYTES_PER_MS


# --- 9. the whole signal in one append ------------------------------------------------------------------------------

TWO_UTTERANCES = tone(1000) + silence(520) + tone(1000) + silence(1000)


def _vad_view(sim: SimSession, events: list[dict]) -> tuple[list, list]:
    marks = [(e["type"], e.get("audio_start_ms", e.get("audio_end_ms")))
             for e in events if e["type"] in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped")]
    user_audio = [len(item.audio) // BYTES_PER_MS for item in sim.items if item.data.get("role") == "user"]
    return marks, user_audio


def test_one_big_append_makes_the_same_turns_as_20_ms_appends():
    whole = new_session()
    marks, user_audio = _vad_view(whole, send(whole, 0.0, type="input_audio_buffer.append", audio=b64(TWO_UTTERANCES)))
    assert [t for t, _ in marks] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"] * 2
    first_end, second_start = marks[1][1], marks[2][1]
    assert second_start >= first_end
    assert sum(user_audio) <= len(TWO_UTTERANCES) // BYTES_PER_MS  # no audio committed twice

    paced = new_session()
    events, _ = append(paced, TWO_UTTERANCES, 0.0)
    assert _vad_view(paced, events) == (marks, user_audio)


# --- 10. a turn_detection change mid-utterance does not split the turn --------------------------------------------


def test_changing_interrupt_response_while_speaking_keeps_one_turn():
    sim = new_session()
    out, now = append(sim, tone(600), 0.0)
    assert len(of_type(out, "input_audio_buffer.speech_started")) == 1
    out += update(sim, now, audio={"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}})
    more, now = append(sim, tone(600) + silence(1000), now)
    out += more
    (started,) = of_type(out, "input_audio_buffer.speech_started")
    (stopped,) = of_type(out, "input_audio_buffer.speech_stopped")
    assert (started["audio_start_ms"], stopped["audio_end_ms"]) == (0, 1200 + 500)
    (committed,) = of_type(out, "input_audio_buffer.committed")
    user = next(item for item in sim.items if item.id == committed["item_id"])
    assert len(user.audio) == 1700 * BYTES_PER_MS


# --- 11. no truncation of an item still being generated --------------------------------------------------------------


def truncate(sim: SimSession, item_id: str, audio_end_ms: int, now: float = 0.0) -> list[dict]:
    return send(sim, now, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)


def test_truncating_an_item_still_being_generated_is_refused_then_works_once_done():
    sim = new_session(vad=False)
    send(sim, 0.0, **user_text("hello there"))
    send(sim, 0.0, type="response.create")
    sim.advance(0.3)  # the first delta: 100 ms of the reply exist
    first = take(sim)
    item_id = of_type(first, "response.output_item.added")[0]["item"]["id"]
    assert of_type(first, "response.output_audio.delta")
    assert [e["code"] for e in errors(truncate(sim, item_id, 50, 0.3))] == ["invalid_value"]
    assert of_type(run_until_idle(sim, 0.3), "response.done")[0]["response"]["status"] == "completed"
    (truncated,) = of_type(truncate(sim, item_id, 50, 5.0), "conversation.item.truncated")
    assert truncated["audio_end_ms"] == 50


# --- 12. truncating a client-created assistant audio message cuts its transcript ----------------------------------


def test_truncating_a_client_created_assistant_audio_message_cuts_its_transcript():
    sim = new_session(vad=False)
    send(sim, 0.0, type="conversation.item.create", item={
        "id": "item_said", "type": "message", "role": "assistant",
        "content": [{"type": "output_audio", "audio": b64(tone(1000)), "transcript": "one two three four"}]})
    assert of_type(truncate(sim, "item_said", 500), "conversation.item.truncated")
    (retrieved,) = of_type(send(sim, 0.0, type="conversation.item.retrieve", item_id="item_said"), "conversation.item.retrieved")
    part = retrieved["item"]["content"][0]
    assert part["transcript"] == "one two"
    assert len(base64.b64decode(part["audio"])) == 500 * BYTES_PER_MS


# --- 13. max_output_tokens ------------------------------------------------------------------------------------------


def test_max_output_tokens_cuts_audio_and_its_transcript_in_proportion():
    sim = new_session(vad=False)
    update(sim, max_output_tokens=10)
    send(sim, 0.0, **user_text("hello there how are you today"))
    out = send(sim, 0.0, type="response.create") + run_until_idle(sim, 0.0)
    audio = b"".join(base64.b64decode(e["delta"]) for e in of_type(out, "response.output_audio.delta"))
    assert len(audio) == 10 * 50 * BYTES_PER_MS  # 50 ms a token
    full = "You said: hello there how are you today"  # 8 words, 8 x 280 ms of speech
    (done,) = of_type(out, "response.output_audio_transcript.done")
    assert done["transcript"] == "You said:"  # ceil(8 words x 500 / 2240 ms) = 2 words
    assert full.startswith(done["transcript"]) and len(done["transcript"].split()) < len(full.split())
    response = of_type(out, "response.done")[0]["response"]
    assert (response["status"], response["status_details"]["reason"]) == ("incomplete", "max_output_tokens")


def test_max_output_tokens_shortens_text_replies():
    sim = new_session(vad=False)
    update(sim, output_modalities=["text"], max_output_tokens=2)
    send(sim, 0.0, **user_text("hello there"))
    out = send(sim, 0.0, type="response.create") + run_until_idle(sim, 0.0)
    (done,) = of_type(out, "response.output_text.done")
    assert done["text"] == "You" and tokens(done["text"]) <= 2
    assert "".join(e["delta"] for e in of_type(out, "response.output_text.delta")) == "You"
    assert of_type(out, "response.done")[0]["response"]["status"] == "incomplete"


# --- 14. response.create with a bad output_modalities ---------------------------------------------------------------


@pytest.mark.parametrize("modalities", [[], ["audio", "text"]], ids=str)
def test_response_output_modalities_must_name_exactly_one(modalities):
    sim = new_session(vad=False)
    out = send(sim, 0.0, type="response.create", response={"output_modalities": modalities})
    assert [(e["code"], e["param"]) for e in errors(out)] == [("invalid_value", "response.output_modalities")]
    assert not of_type(out, "response.created") and sim.response is None


# --- 15. previous_item_id "root" ------------------------------------------------------------------------------------


def test_previous_item_id_root_inserts_at_the_beginning():
    sim = new_session(vad=False)
    send(sim, 0.0, **user_text("a", "item_a"))
    send(sim, 0.0, **user_text("b", "item_b"))
    out = send(sim, 0.0, **user_text("0", "item_first"), previous_item_id="root")
    assert not errors(out)
    (added,) = of_type(out, "conversation.item.added")
    assert added["previous_item_id"] is None
    assert [item.id for item in sim.items] == ["item_first", "item_a", "item_b"]


# --- 17. a tool without "type" --------------------------------------------------------------------------------------


def test_a_tool_without_type_is_echoed_as_a_function():
    sim = new_session()
    (updated,) = of_type(update(sim, tools=[{"name": "f", "parameters": {"type": "object"}}]), "session.updated")
    assert updated["session"]["tools"] == [{"type": "function", "name": "f", "parameters": {"type": "object"}}]


# --- 18. NaN and Infinity are not JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_with_nan_or_infinity_is_invalid_json(constant):
    sim = new_session()
    before = json.dumps(sim.session)
    raw = '{"type":"session.update","session":{"type":"realtime","tracing":{"metadata":{"x":%s}}}}' % constant
    assert [e["code"] for e in errors(send_raw(sim, raw))] == ["invalid_json"]
    assert json.dumps(sim.session) == before


# --- 19. idle_timeout_ms --------------------------------------------------------------------------------------------


def _idle_session() -> tuple[SimSession, list[dict], float]:
    """FAST config, server VAD with idle_timeout_ms=300; the user has said one thing and the reply has gone out."""
    sim = new_session(FAST)
    update(sim, audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 300}}})
    out, now = append(sim, tone(600) + silence(700), 0.0)  # speech stops at 1.1 s; the echo plays until ~2.2 s
    out += run_until_idle(sim, now, limit=0.2)  # the reply is generated (20x real time) but not played yet
    assert [e["response"]["status"] for e in of_type(out, "response.done")] == ["completed"]
    return sim, out, now + 0.2


def test_idle_timeout_after_the_reply_nudges_a_new_response():
    sim, _, now = _idle_session()
    out, _ = append(sim, silence(2500), now)  # silence only, until well past playback end + 300 ms
    types = [e["type"] for e in out]
    assert types.count("input_audio_buffer.timeout_triggered") == 1
    assert "input_audio_buffer.speech_started" not in types
    assert types.index("input_audio_buffer.timeout_triggered") < types.index("response.created")


def test_speaking_before_the_idle_timeout_cancels_it():
    sim, _, now = _idle_session()
    out, _ = append(sim, tone(400) + silence(1200), now)  # the user speaks again before playback end + 300 ms
    types = [e["type"] for e in out]
    assert types.count("input_audio_buffer.speech_started") == 1 and "response.created" in types
    assert "input_audio_buffer.timeout_triggered" not in types


# --- 20. truncating user items ---------------------------------------------------------------------------------------


def test_truncating_user_items_uses_the_service_codes():
    sim = new_session(vad=False)
    send(sim, 0.0, **user_text("t", "item_text"))
    send(sim, 0.0, type="conversation.item.create",
         item={"id": "item_audio", "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": b64(tone(300))}]})
    assert [e["code"] for e in errors(truncate(sim, "item_text", 100))] == ["unsupported_content_type"]
    assert [e["code"] for e in errors(truncate(sim, "item_audio", 100))] == ["invalid_value"]
