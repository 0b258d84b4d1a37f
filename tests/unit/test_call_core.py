"""The call core on a virtual clock: each tick() is one 20 ms step of the playout clock."""

from __future__ import annotations

import json

from relay.core.call import CallCore, ToClient, ToUpstream
from relay.core.reorder import ReorderBuffer

FRAME = b"\x00\x10" * 960  # one 20 ms frame of sound (4096), 48 kHz mono s16
QUIET = bytes(1920)  # one 20 ms frame of silence


def frames(n: int) -> list[bytes]:
    return [FRAME] * n


def client_types(actions) -> list[str]:
    return [a.event["type"] for a in actions if isinstance(a, ToClient)]


def upstream(actions) -> list[dict]:
    return [a.event for a in actions if isinstance(a, ToUpstream)]


def start_response(core: CallCore, response_id: str = "resp_1") -> None:
    core.on_server_event({"type": "response.created", "event_id": "e", "response": {"id": response_id}})


def done(core: CallCore, response_id: str = "resp_1") -> list:
    return core.on_server_event({"type": "response.done", "event_id": "e", "response": {"id": response_id}})


def play(core: CallCore, ticks: int) -> tuple[int, list]:
    sent, actions = 0, []
    for _ in range(ticks):
        frame, more = core.tick()
        sent += frame is not None
        actions += more
    return sent, actions


def test_started_on_first_frame_stopped_after_done_and_drained():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(5), source_ms=100)
    frame, actions = core.tick()
    assert frame == FRAME and client_types(actions) == ["output_audio_buffer.started"]
    assert client_types(done(core)) == ["response.done"]  # 4 frames still queued: not stopped yet
    sent, actions = play(core, 10)
    assert sent == 4 and client_types(actions) == ["output_audio_buffer.stopped"]
    assert core.stats.silence_frames == 6


def test_done_after_the_queue_drained_stops_at_once():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(2), source_ms=40)
    play(core, 3)
    assert client_types(done(core)) == ["response.done", "output_audio_buffer.stopped"]


def test_a_delta_arriving_on_an_empty_queue_plays_on_the_next_tick():
    core = CallCore()
    assert core.tick()[0] is None
    core.on_audio("resp_1", "item_1", frames(1), source_ms=20)
    assert core.tick()[0] == FRAME


def test_barge_in_flushes_cancels_and_truncates_to_what_was_heard():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(50), source_ms=1000)
    play(core, 12)
    actions = core.on_server_event({"type": "input_audio_buffer.speech_started", "event_id": "e", "audio_start_ms": 0, "item_id": "item_u"})
    assert client_types(actions) == ["input_audio_buffer.speech_started", "relay.item.truncated", "output_audio_buffer.cleared"]
    heard = next(a.event for a in actions if isinstance(a, ToClient) and a.event["type"] == "relay.item.truncated")
    assert (heard["item_id"], heard["audio_end_ms"], heard["audio_received_ms"]) == ("item_1", 240, 1000)
    cancel, truncate = upstream(actions)
    assert cancel["type"] == "response.cancel"
    assert truncate == {"type": "conversation.item.truncate", "event_id": truncate["event_id"], "item_id": "item_1", "content_index": 0, "audio_end_ms": 240}
    assert core.tick()[0] is None  # nothing of the interrupted audio after the flush
    core.on_audio("resp_1", "item_1", frames(5), source_ms=100)  # late audio of the cancelled response
    assert core.tick()[0] is None
    assert core.stats.barge_ins == 1 and core.stats.truncations == 1


def test_barge_in_after_generation_ended_truncates_without_cancelling():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(50), source_ms=990)  # the last frame is partly padding
    done(core)
    play(core, 49)
    actions = core.flush()
    (truncate,) = upstream(actions)
    assert truncate["audio_end_ms"] == 980
    core2 = CallCore()
    start_response(core2)
    core2.on_audio("resp_1", "item_1", frames(50), source_ms=990)
    done(core2)
    play(core2, 50)  # everything heard: stopped, nothing to flush
    assert core2.flush() == []


def test_clamped_to_received_audio():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(1), source_ms=7)
    play(core, 1)
    (_, truncate) = upstream(core.flush())
    assert truncate["audio_end_ms"] == 7


def test_nothing_heard_deletes_the_item_instead():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(10), source_ms=200)
    actions = core.flush()
    assert [e["type"] for e in upstream(actions)] == ["response.cancel", "conversation.item.delete"]
    assert core.stats.deletions == 1


def test_speech_with_nothing_playing_does_nothing_extra():
    core = CallCore()
    actions = core.on_server_event({"type": "input_audio_buffer.speech_started", "event_id": "e", "audio_start_ms": 0, "item_id": "i"})
    assert client_types(actions) == ["input_audio_buffer.speech_started"] and upstream(actions) == []


def test_interruptions_off_keeps_talking_and_forces_interrupt_response_false():
    core = CallCore(interruptions=False)
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(10), source_ms=200)
    actions = core.on_server_event({"type": "input_audio_buffer.speech_started", "event_id": "e", "audio_start_ms": 0, "item_id": "i"})
    assert upstream(actions) == [] and core.tick()[0] == FRAME
    update = {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}}
    actions, text = core.on_client_event(json.dumps(update))
    assert actions == [] and json.loads(text)["session"]["audio"]["input"]["turn_detection"]["interrupt_response"] is False
    nulls = json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": None}})
    assert core.on_client_event(nulls) == ([], nulls)  # not the relay's to judge: forwarded untouched


def test_errors_caused_by_our_own_events_are_swallowed_others_forwarded():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(3), source_ms=60)
    cancel = upstream(core.flush())[0]
    own = {"type": "error", "event_id": "e1", "error": {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "x", "event_id": cancel["event_id"]}}
    assert core.on_server_event(own) == []
    foreign = {"type": "error", "event_id": "e2", "error": {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "x", "event_id": "client_1"}}
    assert client_types(core.on_server_event(foreign)) == ["error"]


def test_client_events_policy():
    core = CallCore()
    for text, code in [("not json", "invalid_json"), ("[1]", "invalid_json"), ('{"x": NaN}', "invalid_json"),
                       (json.dumps({"type": "bogus.event"}), "invalid_value"), (json.dumps({}), "missing_required_parameter")]:
        (a,), forwarded = core.on_client_event(text)
        assert a.event["error"]["code"] == code and forwarded is None, text
    (a,), forwarded = core.on_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": "", "event_id": "c1"}))
    assert a.event["error"]["event_id"] == "c1" and forwarded is None
    text = json.dumps({"type": "response.create", "event_id": "c2", "response": {"future_field": 1}})
    assert core.on_client_event(text) == ([], text)  # forwarded exactly as sent: new fields are upstream's business
    assert core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"})) == ([], None)  # nothing playing
    assert core.stats.client_errors == 6


def test_audio_formats_are_the_relays_to_choose():
    core = CallCore()
    pcmu = {"type": "audio/pcmu"}
    update = {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": pcmu}, "output": {"format": pcmu}}}}
    _, text = core.on_client_event(json.dumps(update))
    audio = json.loads(text)["session"]["audio"]
    assert audio["input"]["format"] == audio["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    create = {"type": "response.create", "response": {"audio": {"output": {"format": pcmu, "voice": "marin"}}}}
    _, text = core.on_client_event(json.dumps(create))
    assert json.loads(text)["response"]["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}


def test_the_sessions_own_interrupt_response_false_is_honoured():
    core = CallCore()
    core.on_server_event({"type": "session.updated", "event_id": "e", "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}}}})
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(10), source_ms=200)
    actions = core.on_server_event({"type": "input_audio_buffer.speech_started", "event_id": "e", "audio_start_ms": 0, "item_id": "i"})
    assert upstream(actions) == [] and core.tick()[0] == FRAME


def test_malformed_upstream_events_are_forwarded_without_breaking_the_state():
    core = CallCore()
    for event in [{"type": "response.created"}, {"type": "response.done", "response": "x"},
                  {"type": "response.done", "response": {"id": ["unhashable"]}}, {"type": "session.updated", "session": None}]:
        assert client_types(core.on_server_event(event)) == [event["type"]]
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(2), source_ms=40)
    assert core.tick()[0] == FRAME


def test_no_cleared_event_when_no_audio_was_flushed():
    core = CallCore()
    start_response(core)  # generating, no audio yet
    actions = core.flush()
    assert [e["type"] for e in upstream(actions)] == ["response.cancel"] and client_types(actions) == []


def test_client_clear_flushes_like_a_barge_in():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(10), source_ms=200)
    play(core, 3)
    actions, forwarded = core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"}))
    assert client_types(actions) == ["relay.item.truncated", "output_audio_buffer.cleared"] and forwarded is None
    assert [e["type"] for e in upstream(actions)] == ["response.cancel", "conversation.item.truncate"]


def test_an_sdks_interrupt_cancels_once():
    """OpenAI's SDKs interrupt with response.cancel, then output_audio_buffer.clear: the client's cancel goes up,
    the flush adds none of its own (it could only be refused), and still truncates to what was heard."""
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(10), source_ms=200)
    play(core, 3)
    cancel = json.dumps({"type": "response.cancel", "event_id": "c1"})
    assert core.on_client_event(cancel) == ([], cancel)
    actions, _ = core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"}))
    assert [e["type"] for e in upstream(actions)] == ["conversation.item.truncate"]
    assert client_types(actions) == ["relay.item.truncated", "output_audio_buffer.cleared"]
    # A cancel naming another response is not this one's: the relay still cancels it.
    done(core)
    start_response(core, "resp_3")
    core.on_audio("resp_3", "item_3", frames(10), source_ms=200)
    play(core, 3)
    core.on_client_event(json.dumps({"type": "response.cancel", "response_id": "resp_other"}))
    actions, _ = core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"}))
    assert [e["type"] for e in upstream(actions)] == ["response.cancel", "conversation.item.truncate"]
    # The next response is the relay's to cancel again.
    done(core, "resp_3")
    start_response(core, "resp_2")
    core.on_audio("resp_2", "item_2", frames(10), source_ms=200)
    play(core, 3)
    actions, _ = core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"}))
    assert [e["type"] for e in upstream(actions)] == ["response.cancel", "conversation.item.truncate"]


def test_state_is_forgotten_after_each_response():
    core = CallCore()
    for n in range(100):
        start_response(core, f"resp_{n}")
        core.on_audio(f"resp_{n}", f"item_{n}", frames(2), source_ms=40)
        play(core, 2)
        done(core, f"resp_{n}")
        start_response(core, f"text_{n}")
        done(core, f"text_{n}")  # a response without audio
    assert not core._items and not core._done and not core._queued_by_response and not core._flushed


def test_reorder_buffer_releases_in_order_and_keeps_no_delay_after_a_loss():
    buf: ReorderBuffer[int] = ReorderBuffer(window=2)
    assert buf.push(10, 10) == [10]
    assert buf.push(12, 12) == []  # 11 may still come
    assert buf.push(11, 11) == [11, 12]  # it did: both at once
    assert buf.push(14, 14) == [] and buf.push(15, 15) == []
    assert buf.push(16, 16) == [14, 15, 16]  # 13 is lost: give up, release everything ready
    assert buf.lost == 1
    assert buf.push(13, 13) == [] and buf.late == 1  # too late now
    assert buf.push(17, 17) == [17]  # back to zero delay


def test_reorder_buffer_wraps_and_restarts():
    buf: ReorderBuffer[int] = ReorderBuffer(window=1)
    assert buf.push(65535, 1) == [1]
    assert buf.push(0, 2) == [2]
    assert buf.push(30000, 3) == [3]  # a jump this large is a new stream
    assert buf.push(30001, 4) == [4]
    assert buf.push(30001, 4) == [] and buf.late == 1  # duplicate


def test_leading_silence_is_skipped_pauses_are_not_and_skipped_frames_count_as_played():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", [QUIET] * 2, source_ms=40)  # a first delta of silence only
    core.on_audio("resp_1", "item_1", [QUIET] + [FRAME] * 2 + [QUIET] * 2 + [FRAME], source_ms=120)
    assert core.stats.leading_silence_skipped == 3
    played = [core.tick()[0] for _ in range(6)]
    assert played == [FRAME, FRAME, QUIET, QUIET, FRAME, None]  # a pause inside speech is never cut
    core2 = CallCore()
    start_response(core2)
    core2.on_audio("resp_1", "item_1", [QUIET] * 4 + [FRAME] * 10, source_ms=280)
    core2.tick()
    (_, truncate) = upstream(core2.flush())
    assert truncate["audio_end_ms"] == 5 * 20  # 4 skipped + 1 played, in the item's own time


def test_a_live_stream_wins_back_a_burst_in_its_pauses():
    core = CallCore()
    start_response(core)
    for _ in range(60):  # a second and more of audio arriving in real time, one frame a tick
        core.on_audio("resp_1", "item_1", [FRAME], source_ms=20)
        core.tick()
    core.on_audio("resp_1", "item_1", [FRAME, QUIET, QUIET, QUIET, QUIET, FRAME], source_ms=120)  # a burst
    core.tick()  # sound is never skipped
    core.on_audio("resp_1", "item_1", [FRAME], source_ms=20)
    core.tick()  # behind by 5 frames, live, silence at the head: skipped down to the target, then one played
    assert core.stats.live_silence_skipped == 4 and len(core._queue) == 1


def test_a_faster_than_real_time_reply_keeps_its_pauses():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", ([FRAME] * 20 + [QUIET] * 10) * 10, source_ms=6000)  # 6 s at once
    played = [core.tick()[0] for _ in range(300)]  # nothing more arrives while it plays: not a live stream
    assert played.count(QUIET) == 100 and core.stats.live_silence_skipped == 0


def test_server_tool_outputs_ask_for_a_reply_only_when_the_model_can_give_one():
    from relay.core.call import RunTools

    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    core = CallCore(server_tools=tools)

    def done(response_id, *names):
        output = [{"type": "function_call", "name": n, "call_id": f"call_{n}", "arguments": "{}",
                   "status": "completed"} for n in names]
        return core.on_server_event({"type": "response.done", "response": {"id": response_id, "output": output}})

    core.on_server_event({"type": "response.created", "response": {"id": "resp_1"}})
    (run,) = [a for a in done("resp_1", "lookup") if isinstance(a, RunTools)]
    assert run.calls == [("call_lookup", "lookup", "{}")] and run.respond
    # The user spoke meanwhile: a response is under way, so the reply is asked for when it is done.
    core.on_server_event({"type": "response.created", "response": {"id": "resp_2"}})
    sent = [a.event["type"] for a in core.tool_outputs([("call_lookup", "42")])]
    assert sent == ["conversation.item.create"]
    after = [a.event["type"] for a in done("resp_2") if hasattr(a, "event") and a.event["type"] == "response.create"]
    assert after == ["response.create"]
    # A response that also called a client's tool: the client answers it and asks for the reply itself.
    core.on_server_event({"type": "response.created", "response": {"id": "resp_3"}})
    (run,) = [a for a in done("resp_3", "lookup", "open_door") if isinstance(a, RunTools)]
    assert not run.respond
    assert [a.event["type"] for a in core.tool_outputs([("call_lookup", "1")], respond=False)] == ["conversation.item.create"]
