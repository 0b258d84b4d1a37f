"""Conformance with the GA types of the official `openai` package (the oracle, see tests/oracle.py).

Every event any test sends or receives through tests.helpers is checked as it passes. This module adds:
a tour that makes the simulator emit every event type its code can emit (proved by reading the code), the
vocabulary of relay.protocol against the oracle's, and a few hand-written events from the protocol notes.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent

import relay.simulator.session as sim_session
from relay.protocol import CLIENT_EVENT_TYPES, SERVER_EVENT_TYPES, parse_client_event
from tests.helpers import connect, load_pcm, silence
from tests.oracle import check_client_event, check_server_event

HELLO = load_pcm("speech_hello_24k.wav")


def _oracle_types(union) -> set[str]:
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(cls.model_fields["type"].annotation)[0] for cls in members}


def _types_the_simulator_emits() -> set[str]:
    source = Path(sim_session.__file__).read_text()
    return set(re.findall(r'_emit\(\s*"([a-z_.]+)"', source)) | {"error"}


async def _tour(url: str) -> list[dict]:
    """One session that goes through everything the simulator can say."""
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(
            audio={"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
            tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}},
                   {"type": "mcp", "server_label": "wiki", "server_url": "https://mcp.example.com/mcp",
                    "allowed_tools": ["ask_question"]}],
        )
        await client.until("mcp_list_tools.completed")  # an MCP entry's tools are listed
        await client.append(silence(400) + HELLO + silence(900))  # speech, commit, echo, transcription
        done = await client.until("response.done")
        await client.seen("conversation.item.input_audio_transcription.completed")
        assistant_id = done["response"]["output"][0]["id"]
        await client.send({"type": "conversation.item.truncate", "item_id": assistant_id, "content_index": 0, "audio_end_ms": 300})
        await client.until("conversation.item.truncated")
        await client.send({"type": "conversation.item.retrieve", "item_id": assistant_id})
        await client.until("conversation.item.retrieved")
        await client.send({"type": "conversation.item.delete", "item_id": assistant_id})
        await client.until("conversation.item.deleted")
        await client.append(silence(100))
        await client.send({"type": "input_audio_buffer.clear"})
        await client.until("input_audio_buffer.cleared")
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "please lookup {\"q\": 1}"}]}})
        await client.send({"type": "response.create"})
        await client.until("response.function_call_arguments.done")
        await client.until("response.done")
        await client.send({"type": "response.create", "response": {"output_modalities": ["text"], "tool_choice": "none"}})
        await client.until("response.output_text.done")
        await client.until("response.done")
        await client.send({"type": "response.cancel"})
        await client.error()
        # A spoken reply, then silence from the user past idle_timeout_ms: the service nudges a response.
        await client.update(audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 200}}})
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
        await client.send({"type": "response.create"})
        await client.until("response.done")
        await client.until("input_audio_buffer.timeout_triggered", timeout=10)
        await client.until("response.done")
        return client.events


async def test_the_simulator_emits_every_type_it_can_and_all_conform(url):
    events = await _tour(url)  # each one already checked by the oracle in RealtimeClient.recv
    seen = {e["type"] for e in events}
    missing = _types_the_simulator_emits() - seen
    assert not missing, f"the tour did not produce: {sorted(missing)}"
    assert seen <= _oracle_types(RealtimeServerEvent)


def test_client_vocabulary_is_exactly_the_ga_one():
    assert set(CLIENT_EVENT_TYPES) == _oracle_types(RealtimeClientEvent)


def test_every_modelled_server_event_exists_in_the_ga_types():
    assert set(SERVER_EVENT_TYPES) <= _oracle_types(RealtimeServerEvent)


def test_the_protocol_notes_session_example_is_valid_both_ways():
    session = {
        "type": "realtime", "model": "gpt-realtime", "instructions": "Be brief.", "output_modalities": ["audio"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "transcription": {"model": "gpt-4o-mini-transcribe"},
                            "noise_reduction": {"type": "near_field"},
                            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                               "silence_duration_ms": 500, "create_response": True,
                                               "interrupt_response": True, "idle_timeout_ms": None}},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0}},
        "tools": [], "tool_choice": "auto", "max_output_tokens": "inf",
    }
    update = {"type": "session.update", "session": session}
    check_client_event(update)
    assert parse_client_event(update).session.audio.input.turn_detection.threshold == 0.5
    check_server_event({"type": "session.updated", "event_id": "event_1", "session": session})


@pytest.mark.parametrize(
    "event",
    [
        {"type": "error", "event_id": "event_2", "error": {"type": "invalid_request_error", "code": "invalid_value",
         "message": "x", "param": None, "event_id": "evt_9"}},
        {"type": "output_audio_buffer.started", "event_id": "event_3", "response_id": "resp_1"},
        {"type": "output_audio_buffer.stopped", "event_id": "event_4", "response_id": "resp_1"},
        {"type": "output_audio_buffer.cleared", "event_id": "event_5", "response_id": "resp_1"},
        {"type": "input_audio_buffer.timeout_triggered", "event_id": "event_6", "audio_start_ms": 1, "audio_end_ms": 2, "item_id": "item_1"},
    ],
    ids=lambda e: e["type"],
)
def test_events_the_relay_itself_will_send_conform(event):
    check_server_event(event)


def test_the_oracle_rejects_undeclared_keys_and_missing_fields():
    with pytest.raises(AssertionError, match="colour"):
        check_server_event({"type": "conversation.item.deleted", "event_id": "e", "item_id": "i", "colour": "red"})
    with pytest.raises(Exception):
        check_server_event({"type": "conversation.item.deleted", "event_id": "e"})
