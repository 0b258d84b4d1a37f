"""Fuzzing a call with what its two sides may send: data-channel messages from the client, events from the
upstream, and both interleaved with the playout clock. Over thousands of cases: no unhandled exception (the call's
own guard would turn one into a `server_error` event and an error log line), only valid JSON to the client, and
bounded queues. Crashing inputs found become fixtures in crashers/, replayed first."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from relay.config import Settings
from relay.call.call import Call
from relay.call.peer import MAX_PENDING_CLIENT_EVENTS
from relay.call.upstream import MAX_UPSTREAM_BACKLOG_BYTES
from relay.tools import Toolbox
from relay.upstream.target import UpstreamTarget
from tests.fuzz.strategies import as_text, client_events, server_events

CRASHERS = Path(__file__).parent / "crashers"
FUZZ = settings(max_examples=800, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class RecordingChannel:
    """Stands in for the data channel of a connected client: records what the relay sends it."""

    readyState = "open"
    bufferedAmount = 0

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, text: str) -> None:
        self.sent.append(text)


def a_call(policy_fields: str = "audio,include,max_output_tokens,output_modalities,truncation") -> Call:
    settings = Settings.load(env={}, client_session_fields=policy_fields)
    call = Call(settings, UpstreamTarget("url", "ws://127.0.0.1:9/unused"), on_closed=lambda c: None,
                toolbox=Toolbox.load(["relay.tools.examples"]))
    call.peer.channel = RecordingChannel()
    return call


def check(call: Call, caplog) -> None:
    for text in call.peer.channel.sent:
        event = json.loads(text)
        assert isinstance(event, dict) and isinstance(event.get("type"), str)
    # The call's guards log an unhandled exception at ERROR (and tell the client `server_error`).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records[-1].getMessage()
    assert len(call.peer.pending) <= MAX_PENDING_CLIENT_EVENTS
    assert call.upstream.outbox_bytes <= MAX_UPSTREAM_BACKLOG_BYTES + 64 * 1024  # the relay's own events may pass
    assert not call.closed.is_set() and call.close_reason is None


def replay(call: Call, steps: list[tuple[str, str]]) -> None:
    for side, text in steps:
        if side == "client":
            call.peer.on_message(text)
        elif side == "upstream":
            call.upstream.on_text(text)
        else:
            call.next_frame()


step = st.one_of(st.tuples(st.just("client"), as_text(client_events)),
                 st.tuples(st.just("upstream"), as_text(server_events)),
                 st.tuples(st.just("tick"), st.just("")))


@pytest.mark.parametrize("path", sorted(CRASHERS.glob("*.json")), ids=lambda p: p.stem)
async def test_crashers_found_by_fuzzing_stay_fixed(path, caplog):
    call = a_call()
    replay(call, [tuple(s) for s in json.loads(path.read_text())])
    check(call, caplog)
    await call.close("test over")


@FUZZ
@given(st.lists(step, max_size=30))
async def test_a_call_survives_anything_either_side_sends(caplog, steps):
    caplog.clear()
    call = a_call()
    try:
        replay(call, steps)
        check(call, caplog)
    except BaseException:
        _save_crasher(steps)
        raise
    finally:
        await call.close("test over")


@FUZZ
@given(st.lists(as_text(client_events), max_size=20))
async def test_the_event_policy_refuses_or_forwards_every_client_message(caplog, messages):
    """Every message gets exactly one of: forwarded upstream (as valid JSON), or an error event back."""
    caplog.clear()
    call = a_call(policy_fields="audio")
    try:
        for text in messages:
            sent, queued = len(call.peer.channel.sent), len(call.upstream.outbox)
            call.peer.on_message(text)
            answered = [json.loads(t) for t in call.peer.channel.sent[sent:]]
            forwarded = list(call.upstream.outbox)[queued:]
            for upstream in forwarded:
                assert isinstance(json.loads(upstream), dict)
            errors = [e for e in answered if e["type"] == "error"]
            assert forwarded or errors or json.loads(text).get("type") == "output_audio_buffer.clear"
        check(call, caplog)
    except BaseException:
        _save_crasher([("client", m) for m in messages])
        raise
    finally:
        await call.close("test over")


def _save_crasher(steps: list) -> None:
    """Keep a failing input for the replay test (hypothesis shrinks first: the last one saved is the smallest)."""
    CRASHERS.mkdir(exist_ok=True)
    (CRASHERS / "last-failure.json").write_text(json.dumps(steps, ensure_ascii=False))
