"""The call core on a virtual clock: each tick() is one 20 ms step of the playout clock."""

from __future__ import annotations

import json

from relay.core.call import CallCore, ToClient, ToUpstream
from relay.core.reorder import ReorderBuffer

FRAME = b"\x00\x10" * 1920  # one 20 ms frame of sound (4096), 48 kHz stereo s16
QUIET = bytes(3840)  # one 20 ms frame of silence


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
    assert client_types(actions) == ["input_audio_buffer.speech_started", "output_audio_buffer.cleared"]
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
    (forwarded,) = upstream(core.on_client_event(json.dumps(update)))
    assert forwarded["session"]["audio"]["input"]["turn_detection"]["interrupt_response"] is False


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
    (a,) = core.on_client_event("not json")
    assert a.event["type"] == "error" and a.event["error"]["code"] == "invalid_json"
    (a,) = core.on_client_event(json.dumps({"type": "bogus.event"}))
    assert a.event["error"]["code"] == "invalid_value"
    (a,) = core.on_client_event(json.dumps({"type": "input_audio_buffer.append", "audio": "", "event_id": "c1"}))
    assert isinstance(a, ToClient) and a.event["error"]["event_id"] == "c1"
    (a,) = core.on_client_event(json.dumps({"type": "response.create", "event_id": "c2"}))
    assert a == ToUpstream({"type": "response.create", "event_id": "c2"})
    assert core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"})) == []  # nothing playing
    assert core.stats.client_errors == 3


def test_client_clear_flushes_like_a_barge_in():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", frames(10), source_ms=200)
    play(core, 3)
    actions = core.on_client_event(json.dumps({"type": "output_audio_buffer.clear"}))
    assert client_types(actions) == ["output_audio_buffer.cleared"]
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


def test_leading_silence_is_skipped_only_while_behind_and_counts_as_played():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", [QUIET] * 3 + [FRAME] * 2 + [QUIET] * 2 + [FRAME], source_ms=160)
    frame, _ = core.tick()  # behind by 7 frames: the 3 leading silent frames are skipped
    assert frame == FRAME and core.stats.leading_silence_skipped == 3
    played = [core.tick()[0] for _ in range(4)]
    assert played == [FRAME, QUIET, QUIET, FRAME]  # a pause inside speech is never cut
    assert core.stats.frames_played == 5


def test_leading_silence_plays_when_not_behind_and_truncation_counts_skipped_frames():
    core = CallCore()
    start_response(core)
    core.on_audio("resp_1", "item_1", [QUIET], source_ms=20)
    assert core.tick()[0] == QUIET  # nothing queued behind it: nothing to win back
    core.on_audio("resp_1", "item_1", [QUIET] * 4 + [FRAME] * 10, source_ms=280)
    core.tick()
    (_, truncate) = upstream(core.flush())
    assert truncate["audio_end_ms"] == 6 * 20  # 1 played + 4 skipped + 1 played, in the item's own time
