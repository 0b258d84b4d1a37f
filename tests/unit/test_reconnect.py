"""The reconnect plan (relay/core/reconnect.py), and what the call core and the history do when a session is lost."""

from __future__ import annotations

import json

from relay.core.call import CallCore, ToClient
from relay.core.history import History
from relay.core.reconnect import (
    BACKOFF_CAP_S, backoff_delays, is_fatal, rollover_at, session_to_replay, still_to_send,
)
from tests.oracle import check_server_event
from tests.unit.test_call_core import client_types, frames, play, start_response


def test_refused_keys_and_requests_are_fatal_network_losses_and_expiry_are_not():
    assert is_fatal(3000, None) and is_fatal(4000, None) and is_fatal(1008, None)
    assert is_fatal(1011, "invalid_api_key") and is_fatal(None, "insufficient_quota")
    for code in (1000, 1001, 1006, 1011, None):
        assert not is_fatal(code, None)
    assert not is_fatal(1000, "session_expired") and not is_fatal(1006, "invalid_value")


def test_backoff_starts_at_once_doubles_with_jitter_and_is_capped():
    assert backoff_delays(0, 0.5) == []
    assert backoff_delays(5, 0.5, rng=lambda: 1.0) == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff_delays(5, 0.5, rng=lambda: 0.0) == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert max(backoff_delays(20, 0.5, rng=lambda: 1.0)) == BACKOFF_CAP_S


def test_rollover_is_due_ahead_of_expiry_but_never_in_a_sessions_first_half():
    assert rollover_at(1000.0, 1000 + 3600, 300) == 1000 + 3300
    assert rollover_at(1000.0, 1006, 4) == 1003.0  # a short session: half-way, not at once
    assert rollover_at(1000.0, 1000 + 3600, 0) is None  # off
    assert rollover_at(1000.0, None, 300) is None and rollover_at(1000.0, True, 300) is None


def test_the_session_replayed_is_the_effective_one_without_the_servers_own_keys():
    session = {"type": "realtime", "id": "sess_1", "object": "realtime.session", "expires_at": 1,
               "instructions": "Be brief.", "audio": {"input": {"turn_detection": None}}, "prompt": None}
    assert session_to_replay(session) == {"type": "realtime", "instructions": "Be brief.",
                                          "audio": {"input": {"turn_detection": None}}}
    assert session_to_replay(None) is None


def test_a_new_session_gets_what_still_means_something_to_it():
    def text(event: dict) -> str:
        return json.dumps(event, separators=(",", ":"))

    audio = '{"type":"input_audio_buffer.append","audio":"AAAA"}'
    update = text({"type": "session.update", "session": {"type": "realtime", "instructions": "x"}})
    item = text({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "Hi."}]}})
    spoken = text({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                "content": [{"type": "input_audio", "audio": "AAAA"}]}})
    own_truncate = text({"type": "conversation.item.truncate", "event_id": "relay_evt_1", "item_id": "it"})
    own_respond = text({"type": "response.create", "event_id": "relay_evt_2"})
    client_cancel = text({"type": "response.cancel", "event_id": "evt_client"})
    assert still_to_send([audio, update, item, spoken, own_truncate, own_respond, client_cancel]) == \
        [update, spoken, own_respond, client_cancel]  # the spoken item has no text for the replay: it goes as is


def test_a_lost_reply_gets_its_response_done_and_its_audio_still_plays():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(5), source_ms=100)
    play(core, 2)
    assert not core.idle and not core.quiet
    actions = core.upstream_lost()
    assert client_types(actions) == ["response.done"]
    done = actions[0].event
    check_server_event(done)  # a valid GA event: clients built on the SDK take it as the reply's end
    assert done["response"]["status"] == "failed" and done["response"]["id"] == "resp_1"
    sent, actions = play(core, 5)
    assert sent == 3 and client_types(actions) == ["output_audio_buffer.stopped"]
    assert core.idle and core.quiet
    assert core.upstream_lost() == []  # nothing under way: nothing to end


def test_a_tool_output_waiting_for_a_lost_reply_asks_the_new_session_to_answer():
    core = CallCore(server_tools=[{"type": "function", "name": "lookup", "parameters": {}}])
    start_response(core)
    actions = core.tool_outputs([("call_1", "42")])  # a reply is under way: the request waits for its end
    assert [a.event["type"] for a in actions] == ["conversation.item.create"]
    assert [a.event["type"] for a in core.upstream_lost() if not isinstance(a, ToClient)] == ["response.create"]


def test_the_user_speaking_is_not_a_quiet_moment():
    core = CallCore()
    assert core.quiet
    core.on_server_event({"type": "input_audio_buffer.speech_started", "event_id": "e", "item_id": "u1",
                          "audio_start_ms": 0})
    assert not core.quiet
    core.on_server_event({"type": "input_audio_buffer.speech_stopped", "event_id": "e", "item_id": "u1",
                          "audio_end_ms": 900})
    assert core.quiet
    core.on_server_event({"type": "input_audio_buffer.speech_started", "event_id": "e", "item_id": "u2",
                          "audio_start_ms": 1000})
    core.upstream_lost()
    assert core.quiet  # that session's turn is gone with it


def test_the_words_of_a_lost_reply_are_kept_and_replayed():
    history = History({})
    history.on_client_event({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]}})
    for delta in ("You said: ", "My name"):
        history.on_server_event({"type": "response.output_audio_transcript.delta", "item_id": "it_1",
                                 "response_id": "r", "delta": delta})
    history.on_upstream_lost()
    history.on_truncated("it_1", audio_end_ms=500, audio_received_ms=1000)  # the user barged in after it
    reply = history.entries[-1]
    assert reply["incomplete"] and reply["full_text"] == "You said: My name" and reply["text"] == "You said:"
    assert [i["content"][0]["text"] for i in history.replay_items()] == ["My name is Ada.", "You said:"]
    history.on_upstream_lost()
    assert len(history.entries) == 2  # each lost reply once


def test_every_item_a_client_adds_is_kept_for_a_replay():
    history = History({})
    for item in (
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ):
        history.on_client_event({"type": "conversation.item.create", "item": item})
    assert [i["type"] for i in history.replay_items()] == ["message", "function_call", "function_call_output"]
    assert history.replay_items()[0]["content"][0]["text"] == "Hello."


def test_a_long_reply_under_way_is_kept_bounded():
    history = History({})
    for _ in range(10_000):
        history.on_server_event({"type": "response.output_text.delta", "item_id": "it", "delta": "word " * 10})
    history.on_upstream_lost()
    assert len(history.entries[-1]["text"]) <= 64 * 1024
