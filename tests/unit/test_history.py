"""The call's history and usage, sans-I/O: what goes into the transcript, how interrupted speech is cut, costs."""

from __future__ import annotations

import pytest

from relay.config import DEFAULT_PRICES
from relay.core.history import History, cost_usd, usage_tokens

USAGE = {
    "total_tokens": 1000, "input_tokens": 600, "output_tokens": 400,
    "input_token_details": {"text_tokens": 100, "audio_tokens": 500, "cached_tokens": 200,
                            "cached_tokens_details": {"text_tokens": 50, "audio_tokens": 150}},
    "output_token_details": {"text_tokens": 40, "audio_tokens": 360},
}


def history() -> History:
    return History(DEFAULT_PRICES, clock=lambda: 1000.0)


def test_usage_counts_cached_input_apart_and_prices_each_kind():
    tokens = usage_tokens(USAGE)
    assert tokens == {"audio_input": 350, "cached_audio_input": 150, "text_input": 50, "cached_text_input": 50,
                      "audio_output": 360, "text_output": 40}
    expected = (350 * 32 + 150 * 0.4 + 50 * 4 + 50 * 0.4 + 360 * 64 + 40 * 16) / 1e6
    assert cost_usd(tokens, DEFAULT_PRICES) == pytest.approx(expected)
    assert usage_tokens({"input_tokens": "lots", "input_token_details": None}) == dict.fromkeys(tokens, 0)


def test_every_response_done_adds_to_the_totals_and_yields_a_usage_event():
    h = history()
    first = h.on_server_event({"type": "response.done", "response": {"id": "resp_1", "usage": USAGE}})
    second = h.on_server_event({"type": "response.done", "response": {"id": "resp_2", "usage": USAGE}})
    assert first["type"] == "relay.usage" and first["response_id"] == "resp_1" and first["event_id"]
    assert second["total"]["responses"] == 2 and second["total"]["input_tokens"] == 1200
    assert second["total"]["cost_usd"] == pytest.approx(2 * first["cost_usd"])
    assert h.on_server_event({"type": "response.done", "response": {"id": "resp_3"}}) is None  # no usage given
    assert [e["type"] for e in h.entries] == ["usage", "usage"]  # kept in the transcript


def test_the_transcript_has_both_sides_and_tool_calls_in_order():
    h = history()
    h.on_server_event({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u",
                       "transcript": "What time is it?"})
    h.on_server_event({"type": "response.function_call_arguments.done", "item_id": "item_f", "call_id": "call_1",
                       "name": "current_time", "arguments": "{}"})
    h.on_client_event({"type": "conversation.item.create",
                       "item": {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}})
    h.on_server_event({"type": "response.output_audio_transcript.done", "item_id": "item_a",
                       "transcript": "It is noon."})
    h.on_client_event({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]}})
    assert [(e["role"], e["type"]) for e in h.entries] == [
        ("user", "message"), ("assistant", "function_call"), ("tool", "function_call_output"),
        ("assistant", "message"), ("user", "message")]
    assert [e["seq"] for e in h.entries] == [0, 1, 2, 3, 4]
    assert h.entries[3]["text"] == "It is noon." and h.entries[4]["text"] == "Thanks"
    assert h.take_new() == h.entries and h.take_new() == []


@pytest.mark.parametrize("transcript_first", [True, False])
def test_an_interrupted_reply_keeps_the_words_that_were_heard(transcript_first):
    h = history()
    done = {"type": "response.output_audio_transcript.done", "item_id": "item_a",
            "transcript": "one two three four five six seven eight nine ten"}
    if transcript_first:
        h.on_server_event(done)
        h.take_new()
        h.on_truncated("item_a", audio_end_ms=1200, audio_received_ms=4000)
    else:
        h.on_truncated("item_a", audio_end_ms=1200, audio_received_ms=4000)
        h.on_server_event(done)
    (entry,) = h.entries
    assert entry["text"] == "one two three" and entry["full_text"] == done["transcript"]
    assert entry["interrupted"] and entry["heard_ms"] == 1200
    assert h.take_new() == [entry]  # a corrected entry is logged again


def test_a_history_reads_back_from_its_log_the_later_line_winning():
    h = history()
    h.on_server_event({"type": "response.output_audio_transcript.done", "item_id": "item_a", "transcript": "a b c d"})
    log = list(h.take_new())
    h.on_truncated("item_a", 500, 1000)
    h.on_server_event({"type": "response.done", "response": {"id": "resp_1", "usage": USAGE}})
    log += [dict(e) for e in h.take_new()]
    back = History.from_log(log + [{"garbage": True}, "not an entry"], DEFAULT_PRICES)
    assert [e["text"] for e in back.entries if e["type"] == "message"] == ["a b"]
    assert back.usage.as_dict() == h.usage.as_dict()


def test_a_spoken_turn_keeps_its_place_before_the_reply_when_its_transcription_comes_late():
    h = history()
    h.on_server_event({"type": "conversation.item.added", "item": {
        "id": "item_u", "type": "message", "role": "user", "content": [{"type": "input_audio", "transcript": None}]}})
    h.on_server_event({"type": "response.output_audio_transcript.done", "item_id": "item_a", "transcript": "Hi!"})
    h.on_server_event({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u",
                       "transcript": "Hello"})
    assert [(e["role"], e["text"]) for e in h.entries] == [("user", "Hello"), ("assistant", "Hi!")]
    assert [i["content"][0]["text"] for i in h.replay_items()] == ["Hello", "Hi!"]  # replayed in order
    # A typed message is added by the client's own event, not again when the service echoes it.
    h.on_server_event({"type": "conversation.item.added", "item": {
        "id": "item_t", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "typed"}]}})
    assert len(h.entries) == 2


def test_a_long_call_holds_its_last_entries_only_and_counts_all_its_usage():
    history = History({"audio_output": 64.0}, max_entries=10)
    for turn in range(30):
        history.on_server_event({"type": "response.output_audio_transcript.done", "item_id": f"item_{turn}",
                                 "transcript": f"reply {turn}"})
        history.on_truncated(f"item_{turn}", 100, 200)
        history.on_server_event({"type": "response.done", "response": {
            "id": f"resp_{turn}", "usage": {"output_token_details": {"audio_tokens": 10}}}})
    assert len(history.entries) == 10 and history.dropped == 50 and history.next_seq == 60
    assert [e["seq"] for e in history.entries] == list(range(50, 60))
    assert len(history._by_item) <= 10 and len(history._heard) <= 10  # the indexes are pruned with the entries
    assert history.usage.responses == 30 and history.usage.tokens["audio_output"] == 300
    assert [i["content"][0]["text"] for i in history.replay_items(since=58)] == ["reply"]  # half of it heard
    again = History.from_snapshot(history.snapshot(), {"audio_output": 64.0})
    assert again.usage.responses == 30 and again.dropped == 50 and again.next_seq == 60
