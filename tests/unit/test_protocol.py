"""Unit tests for relay.protocol: client event parsing, error mapping, server events, ids."""

from __future__ import annotations

import json
import re

import pytest

from relay.protocol import (
    CLIENT_EVENT_TYPES,
    ProtocolError,
    UnknownServerEvent,
    new_id,
    parse_client_event,
    parse_server_event,
    unknown_fields,
)
from relay.protocol import models as m

# --- client events: the 11 GA types ---------------------------------------------------------------------------

MINIMAL_CLIENT_EVENTS = {
    "session.update": ({"type": "session.update", "session": {"type": "realtime"}}, m.SessionUpdate),
    "input_audio_buffer.append": ({"type": "input_audio_buffer.append", "audio": "AAAA"}, m.InputAudioBufferAppend),
    "input_audio_buffer.commit": ({"type": "input_audio_buffer.commit"}, m.InputAudioBufferCommit),
    "input_audio_buffer.clear": ({"type": "input_audio_buffer.clear"}, m.InputAudioBufferClear),
    "conversation.item.create": (
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        },
        m.ConversationItemCreate,
    ),
    "conversation.item.retrieve": ({"type": "conversation.item.retrieve", "item_id": "item_1"}, m.ConversationItemRetrieve),
    "conversation.item.truncate": (
        {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 1500},
        m.ConversationItemTruncate,
    ),
    "conversation.item.delete": ({"type": "conversation.item.delete", "item_id": "item_1"}, m.ConversationItemDelete),
    "response.create": ({"type": "response.create"}, m.ResponseCreate),
    "response.cancel": ({"type": "response.cancel"}, m.ResponseCancel),
    "output_audio_buffer.clear": ({"type": "output_audio_buffer.clear"}, m.OutputAudioBufferClear),
}


def test_client_event_types_are_exactly_the_11_ga_types():
    assert set(CLIENT_EVENT_TYPES) == set(MINIMAL_CLIENT_EVENTS)
    assert len(CLIENT_EVENT_TYPES) == 11


@pytest.mark.parametrize("event_type", sorted(MINIMAL_CLIENT_EVENTS))
@pytest.mark.parametrize("as_text", [True, False], ids=["json", "dict"])
def test_minimal_client_event_parses(event_type, as_text):
    data, cls = MINIMAL_CLIENT_EVENTS[event_type]
    event = parse_client_event(json.dumps(data) if as_text else dict(data))
    assert type(event) is cls
    assert event.type == event_type
    assert CLIENT_EVENT_TYPES[event_type] is cls


def test_client_event_from_bytes_and_fields_are_kept():
    event = parse_client_event(b'{"type":"conversation.item.truncate","event_id":"ev_1","item_id":"item_9",'
                               b'"content_index":0,"audio_end_ms":1234}')
    assert (event.event_id, event.item_id, event.content_index, event.audio_end_ms) == ("ev_1", "item_9", 0, 1234)


# --- client events: error mapping -----------------------------------------------------------------------------


def _session_update(**session):
    return {"type": "session.update", "session": {"type": "realtime", **session}}


def _turn_detection(**vad):
    return _session_update(audio={"input": {"turn_detection": vad}})


def _truncate(audio_end_ms):
    return {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": audio_end_ms}


def _create_item(item):
    return {"type": "conversation.item.create", "item": item}


ERROR_CASES = [
    pytest.param("{not json", "invalid_json", None, id="invalid-json-text"),
    pytest.param("[1, 2]", "invalid_json", None, id="json-array"),
    pytest.param([{"type": "response.create"}], "invalid_json", None, id="python-list"),
    pytest.param({"event_id": "e"}, "missing_required_parameter", "type", id="missing-type"),
    pytest.param({"type": "response.explode"}, "invalid_value", "type", id="unknown-type"),
    pytest.param({"type": 5}, "invalid_value", "type", id="non-string-type"),
    pytest.param(
        _session_update(audio={"output": {"speedy": 2}}), "unknown_parameter", "session.audio.output.speedy",
        id="unknown-nested-key",
    ),
    pytest.param(
        _create_item({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi", "x": 1}]}),
        "unknown_parameter", "item.content[0].x", id="unknown-key-in-list",
    ),
    pytest.param({"type": "response.cancel", "surprise": True}, "unknown_parameter", "surprise", id="unknown-top-key"),
    pytest.param(
        _turn_detection(type="server_vad", threshold=1.5), "decimal_above_max_value",
        "session.audio.input.turn_detection.threshold", id="threshold-above-max",
    ),
    pytest.param(
        _turn_detection(type="server_vad", threshold=-0.5), "decimal_below_min_value",
        "session.audio.input.turn_detection.threshold", id="threshold-below-min",
    ),
    pytest.param(
        _session_update(max_output_tokens=0), "integer_below_min_value", "session.max_output_tokens",
        id="max-output-tokens-0",
    ),
    pytest.param(_truncate(-5), "integer_below_min_value", "audio_end_ms", id="audio-end-ms-negative"),
    pytest.param(_truncate("5"), "invalid_type", "audio_end_ms", id="audio-end-ms-string-not-coerced"),
    pytest.param(_truncate(True), "invalid_type", "audio_end_ms", id="audio-end-ms-bool-not-coerced"),
    pytest.param(
        _session_update(output_modalities=["video"]), "invalid_value", "session.output_modalities[0]",
        id="output-modalities-video",
    ),
    pytest.param(
        _turn_detection(type="magic_vad"), "invalid_value", "session.audio.input.turn_detection",
        id="bad-turn-detection-type",
    ),
    pytest.param(
        {"type": "session.update", "session": {}}, "missing_required_parameter", "session.type",
        id="session-without-type",
    ),
    pytest.param(
        _create_item({"type": "message", "role": "robot", "content": []}), "invalid_value", "item", id="role-robot",
    ),
]


@pytest.mark.parametrize(("data", "code", "param"), ERROR_CASES)
def test_bad_client_event_maps_to_service_error(data, code, param):
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(data)
    assert (caught.value.code, caught.value.param) == (code, param)
    assert caught.value.error_type == "invalid_request_error"
    assert caught.value.message


def test_unknown_type_message_lists_supported_values():
    with pytest.raises(ProtocolError) as caught:
        parse_client_event({"type": "response.explode"})
    assert "'response.explode'" in caught.value.message
    for event_type in CLIENT_EVENT_TYPES:
        assert f"'{event_type}'" in caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"type": "response.explode", "event_id": "ev_bad"}, id="unknown-type"),
        pytest.param({"type": "session.update", "session": {}, "event_id": "ev_bad"}, id="validation"),
        pytest.param({"type": "response.cancel", "zz": 1, "event_id": "ev_bad"}, id="unknown-parameter"),
        pytest.param(_truncate(-5) | {"event_id": "ev_bad"}, id="range"),
    ],
)
def test_event_id_of_bad_event_is_carried(data):
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(json.dumps(data))
    assert caught.value.event_id == "ev_bad"
    assert caught.value.detail()["event_id"] == "ev_bad"


def test_detail_has_exactly_the_error_keys():
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(_truncate(-5) | {"event_id": "ev_7"})
    detail = caught.value.detail()
    assert set(detail) == {"type", "code", "message", "param", "event_id"}
    assert detail == {
        "type": "invalid_request_error",
        "code": "integer_below_min_value",
        "message": caught.value.message,
        "param": "audio_end_ms",
        "event_id": "ev_7",
    }


def test_detail_without_event_id_or_param():
    detail = ProtocolError("invalid_json", "bad").detail()
    assert detail == {"type": "invalid_request_error", "code": "invalid_json", "message": "bad", "param": None,
                      "event_id": None}


# --- conversation items ---------------------------------------------------------------------------------------

ITEMS = [
    pytest.param({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                 m.UserMessage, id="user-input-text"),
    pytest.param({"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}]},
                 m.UserMessage, id="user-input-audio"),
    pytest.param({"type": "message", "role": "system", "content": [{"type": "input_text", "text": "be brief"}]},
                 m.SystemMessage, id="system"),
    pytest.param({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
                 m.AssistantMessage, id="assistant-output-text"),
    pytest.param({"type": "function_call", "name": "get_weather", "arguments": "{}", "call_id": "call_1"},
                 m.FunctionCall, id="function-call"),
    pytest.param({"type": "function_call_output", "call_id": "call_1", "output": "{\"temp\": 20}"},
                 m.FunctionCallOutput, id="function-call-output"),
]


@pytest.mark.parametrize(("item", "cls"), ITEMS)
def test_conversation_item_parses(item, cls):
    event = parse_client_event(_create_item(item))
    assert type(event.item) is cls
    assert event.item.model_dump(exclude_none=True) == item


# --- server events --------------------------------------------------------------------------------------------


def test_unknown_server_event_passes_through_untouched():
    data = {"type": "response.brand_new_thing", "event_id": "ev_1", "payload": {"a": [1, 2]}}
    event = parse_server_event(data)
    assert isinstance(event, UnknownServerEvent)
    assert event.data is data
    assert event.data == {"type": "response.brand_new_thing", "event_id": "ev_1", "payload": {"a": [1, 2]}}
    assert event.problem is None
    assert event.type == "response.brand_new_thing"


def test_unknown_server_event_from_text():
    event = parse_server_event('{"type":"x.y","n":1}')
    assert isinstance(event, UnknownServerEvent)
    assert event.data == {"type": "x.y", "n": 1}
    assert event.problem is None


def test_known_server_event_missing_field_is_unknown_with_problem():
    data = {"type": "response.done", "event_id": "ev_1"}
    event = parse_server_event(data)
    assert isinstance(event, UnknownServerEvent)
    assert event.data == {"type": "response.done", "event_id": "ev_1"}
    assert event.problem
    assert "response" in event.problem


RESPONSE_DONE = {
    "type": "response.done",
    "event_id": "event_1",
    "response": {
        "id": "resp_1",
        "object": "realtime.response",
        "status": "completed",
        "status_details": None,
        "output": [
            {"id": "item_1", "type": "message", "role": "assistant", "status": "completed",
             "content": [{"type": "output_audio", "transcript": "Hello there."}]},
        ],
        "conversation_id": "conv_1",
        "output_modalities": ["audio"],
        "max_output_tokens": "inf",
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}},
        "usage": {"total_tokens": 30, "input_tokens": 10, "output_tokens": 20,
                  "input_token_details": {"text_tokens": 10, "audio_tokens": 0, "cached_tokens": 0},
                  "output_token_details": {"text_tokens": 5, "audio_tokens": 15}},
        "metadata": None,
    },
}

SESSION_CREATED = {
    "type": "session.created",
    "event_id": "event_2",
    "session": {
        "type": "realtime",
        "object": "realtime.session",
        "id": "sess_1",
        "model": "gpt-realtime",
        "output_modalities": ["audio"],
        "instructions": "Be helpful.",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "prompt": None,
        "expires_at": 1760000000,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 200, "idle_timeout_ms": None,
                                   "create_response": True, "interrupt_response": True},
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
        },
        "include": None,
    },
}

ERROR_EVENT = {
    "type": "error",
    "event_id": "event_3",
    "error": {"type": "invalid_request_error", "code": "invalid_value", "message": "Invalid value: 'x'.",
              "param": "type", "event_id": "ev_client"},
}


def test_response_done_parses():
    event = parse_server_event(json.dumps(RESPONSE_DONE))
    assert type(event) is m.ResponseDone
    assert event.response.status == "completed"
    assert type(event.response.output[0]) is m.AssistantMessage
    assert event.response.output[0].content[0].transcript == "Hello there."
    assert event.response.usage.output_token_details.audio_tokens == 15


def test_session_created_parses_ga_nested_session():
    event = parse_server_event(SESSION_CREATED)
    assert type(event) is m.SessionCreated
    session = event.session
    assert (session.id, session.model, session.object) == ("sess_1", "gpt-realtime", "realtime.session")
    assert type(session.audio.input.turn_detection) is m.ServerVad
    assert session.audio.input.turn_detection.silence_duration_ms == 200
    assert type(session.audio.output.format) is m.AudioPCM
    assert session.audio.output.voice == "marin"


def test_error_event_parses():
    event = parse_server_event(ERROR_EVENT)
    assert type(event) is m.ErrorEvent
    assert (event.error.code, event.error.param, event.error.event_id) == ("invalid_value", "type", "ev_client")


def test_extra_fields_on_known_server_event_are_kept():
    data = json.loads(json.dumps(RESPONSE_DONE))
    data["new_top_level"] = {"x": 1}
    data["response"]["new_nested"] = [1, 2, 3]
    event = parse_server_event(data)
    assert type(event) is m.ResponseDone
    assert event.model_extra == {"new_top_level": {"x": 1}}
    assert event.response.model_extra == {"new_nested": [1, 2, 3]}
    dumped = event.model_dump(mode="json")
    assert dumped["new_top_level"] == {"x": 1}
    assert dumped["response"]["new_nested"] == [1, 2, 3]


@pytest.mark.parametrize("text", ["not json", "{\"type\": ", "[1, 2]", "42"])
def test_server_event_that_is_not_a_json_object_raises_value_error(text):
    with pytest.raises(ValueError):
        parse_server_event(text)


@pytest.mark.parametrize("bad_type", [["response.done"], {"a": 1}], ids=["list", "dict"])
def test_server_event_with_a_non_string_type_is_unknown_not_an_exception(bad_type):
    """A "type" that is a list or an object (unhashable) once raised TypeError; it must pass through."""
    data = {"type": bad_type, "event_id": "ev_1"}
    event = parse_server_event(data)
    assert isinstance(event, UnknownServerEvent)
    assert event.data is data


# --- unknown_fields -------------------------------------------------------------------------------------------


def test_unknown_fields_reports_dotted_paths_with_list_indices():
    event = m.ResponseCreate.model_validate(
        {
            "type": "response.create",
            "top": 1,
            "response": {
                "extra": True,
                "input": [
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
                    {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": "b"}, {"type": "input_text", "text": "c", "deep": 2}]},
                ],
            },
        }
    )
    assert sorted(unknown_fields(event)) == sorted(["top", "response.extra", "response.input[1].content[1].deep"])


def test_unknown_fields_empty_for_declared_fields_only():
    event = m.SessionUpdate.model_validate(_session_update(instructions="x", audio={"output": {"voice": "alloy"}}))
    assert unknown_fields(event) == []


# --- ids ------------------------------------------------------------------------------------------------------


def test_new_id_shape_and_uniqueness():
    ids = [new_id("item") for _ in range(1000)]
    for value in ids:
        assert re.fullmatch(r"item_[A-Za-z0-9]{22}", value), value
    assert len(set(ids)) == 1000
    assert re.fullmatch(r"event_[A-Za-z0-9]{22}", new_id("event"))
