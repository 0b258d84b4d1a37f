"""Health, metrics and logs, piece by piece: the core's turn latency on a virtual clock, late frames, call outcomes,
the capacity rule, the log formatters (and their secret redaction)."""

from __future__ import annotations

import json
import logging
import sys

from aiohttp import web
from prometheus_client import REGISTRY

from relay.config import Settings
from relay.core.call import CallCore
from relay.logs import REDACTED, JsonFormatter, TextFormatter
from relay.call import meter as metrics
from relay.server.calls import CALLS, SETTINGS, STARTING, WORKER, call_capacity, worker_share
from relay.server.workers import Worker
from relay.webrtc.playout import PlayoutTrack
from tests.unit.test_call_core import FRAME, frames, start_response
from tests.unit.test_media import FakeClock


def _speech(core: CallCore, kind: str, now: float) -> None:
    core.on_server_event({"type": f"input_audio_buffer.{kind}", "event_id": "e", "audio_start_ms": 0,
                          "audio_end_ms": 0, "item_id": "item_u"}, now)


def test_turn_latency_runs_from_speech_stopped_to_the_first_frame_of_the_answer():
    core = CallCore()
    _speech(core, "speech_started", 10.0)
    _speech(core, "speech_stopped", 11.0)
    for tick in range(5):  # nothing to play yet: silence, no measurement
        assert core.tick(11.0 + tick * 0.02)[0] is None
    start_response(core, "resp_1")
    core.on_audio("resp_1", "item_1", frames(10), 200)
    frame, _ = core.tick(11.43)
    assert frame == FRAME and [round(s, 6) for s in core.turn_latencies] == [0.43]
    for tick in range(12):  # the rest of the answer does not count again
        core.tick(11.45 + tick * 0.02)
    assert len(core.turn_latencies) == 1


def test_no_turn_latency_without_a_user_turn_or_a_clock():
    core = CallCore()
    start_response(core, "resp_1")  # the model speaks first (a greeting): no user turn to measure from
    core.on_audio("resp_1", "item_1", frames(3), 60)
    core.tick(5.0)
    _speech(core, "speech_started", 6.0)
    _speech(core, "speech_stopped", 7.0)
    start_response(core, "resp_2")
    core.on_audio("resp_2", "item_2", frames(3), 60)
    core.tick()  # an adapter that passes no time: nothing measured, nothing fails
    assert not core.turn_latencies


def test_a_response_created_before_the_user_stopped_is_not_the_answer():
    core = CallCore(interruptions=False)
    start_response(core, "resp_1")
    _speech(core, "speech_started", 1.0)
    _speech(core, "speech_stopped", 2.0)
    core.on_audio("resp_1", "item_1", frames(3), 60)
    core.tick(2.1)  # the old response plays on: not the answer to the turn
    assert not core.turn_latencies
    start_response(core, "resp_2")
    core.on_audio("resp_2", "item_2", frames(3), 60)
    for tick in range(4):
        core.tick(2.5 + tick * 0.02)  # resp_1's last two frames, then resp_2's first
    assert [round(s, 6) for s in core.turn_latencies] == [0.54]


async def test_frames_that_leave_more_than_20_ms_late_are_counted():
    clock = FakeClock()
    track = PlayoutTrack(lambda: None, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        await track.recv()
    clock.now += 0.015  # a little late: within a frame
    await track.recv()
    assert track.late_frames == 0
    await track.recv()
    clock.now += 0.045  # later than a frame, not yet a re-anchor
    await track.recv()
    assert track.late_frames == 1 and track.reanchors == 0
    clock.now += 0.5  # a stall: re-anchored, counted once
    await track.recv()
    assert track.late_frames == 2 and track.reanchors == 1
    assert track.frames_sent == 9


def test_close_reasons_become_few_outcomes():
    assert metrics.outcome("hangup") == metrics.outcome("deleted") == "hangup"
    assert metrics.outcome("idle: no media or messages") == "idle"
    assert metrics.outcome("peer connection failed") == metrics.outcome("peer connection closed") == "client_gone"
    assert metrics.outcome("client not reading its data channel") == "client_gone"
    assert metrics.outcome("upstream lost") == metrics.outcome("upstream unavailable") == "upstream"
    assert metrics.outcome("server shutdown") == "shutdown"
    assert metrics.outcome("ended by a tool") == "tool"
    assert metrics.outcome("maximum duration") == "limit"
    assert metrics.outcome("internal error") == metrics.outcome("setup failed: internal error") == "error"
    assert metrics.outcome("setup failed") == "invalid_offer"
    assert metrics.outcome("something new") == metrics.outcome(None) == "other"
    assert {metrics.outcome(word) for word, _ in metrics._REASON_WORDS} <= set(metrics.OUTCOMES)


def test_a_call_meter_adds_only_what_grew():
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (sample("relay_barge_ins_total"), sample("relay_sent_bytes_total", path="rtp"),
              sample("relay_turn_latency_seconds_count"))
    meter = metrics.CallMeter()
    meter.flush({"barge_ins": 2, "rtp_out": 1000}, [0.5])
    meter.flush({"barge_ins": 2, "rtp_out": 1500}, [])
    meter.flush({"barge_ins": 3, "rtp_out": 1500}, [0.7])
    after = (sample("relay_barge_ins_total"), sample("relay_sent_bytes_total", path="rtp"),
             sample("relay_turn_latency_seconds_count"))
    assert [b - a for a, b in zip(before, after)] == [3, 1500, 2]


def test_each_worker_takes_its_share_of_max_calls():
    assert worker_share(100, 1) == 100 and worker_share(100, 3) == 34 and worker_share(1, 4) == 1
    app = web.Application()
    app[SETTINGS] = Settings.load(env={}, max_calls="3")
    app[WORKER] = Worker(0, 2)
    app[CALLS] = {"rtc_a": object()}
    app[STARTING] = set()
    assert (call_capacity(app).calls, call_capacity(app).limit, call_capacity(app).full) == (1, 2, False)
    app[STARTING].add("rtc_b")  # a call being set up counts
    assert call_capacity(app).full


def _record(message: str, *args, exc: bool = False, **extra) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad key secret-value-123")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.getLogger("relay.call").makeRecord("relay.call", logging.INFO, __file__, 1, message, args,
                                                        exc_info, extra=extra)
    return record


def test_json_lines_carry_the_call_id_and_the_event_fields():
    formatter = JsonFormatter()
    line = json.loads(formatter.format(_record("call %s ended: %s", "rtc_1", "hangup", call_id="rtc_1",
                                               event="ended", duration_s=1.5)))
    assert line["message"] == "call rtc_1 ended: hangup" and line["level"] == "info"
    assert line["logger"] == "relay.call" and line["ts"].endswith("+00:00")
    assert (line["call_id"], line["event"], line["duration_s"]) == ("rtc_1", "ended", 1.5)
    plain = json.loads(formatter.format(_record("relay listening")))
    assert "call_id" not in plain and plain["message"] == "relay listening"


def test_text_lines_show_the_event_fields_after_the_message():
    line = TextFormatter().format(_record("call %s ended: %s", "rtc_1", "hangup", call_id="rtc_1", event="ended"))
    assert line.endswith("relay.call: call rtc_1 ended: hangup event=ended")


def test_secrets_are_blanked_wherever_they_appear():
    secret = "secret-value-123"
    for formatter in (TextFormatter([secret, 'quo"te-secret']), JsonFormatter([secret, 'quo"te-secret'])):
        text = formatter.format(_record("> Authorization: Bearer %s", secret, exc=True, header=secret))
        text += formatter.format(_record('a "quo"te-secret"'))
        assert secret not in text and 'quo"te-secret' not in text and 'quo\\"te-secret' not in text
        assert REDACTED in text
