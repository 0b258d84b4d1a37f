"""Upstream sessions that end under a live call (dropped, refused, expired) and rollover, over real calls: an aiortc
client, the relay's app, the simulator and its fault knobs."""

from __future__ import annotations

import numpy as np
import pytest

from relay.server.calls import CALLS
from tests.integration.test_webrtc_call import HELLO48, Relay, _ended, _serve, relay_settings
from tests.oracle import check_client_event
from tests.webrtc_client import call_relay

SESSION = {"type": "realtime", "instructions": "Be brief.",
           "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}
FAST_RETRIES = {"upstream_retry_backoff_s": "0.05"}


def _say(call, text: str) -> None:
    call.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    call.send({"type": "response.create"})


async def _call_with_a_first_turn(url: str):
    """A call whose user said "My name is Ada." and heard the whole reply."""
    call = await call_relay(url, session=SESSION)
    try:
        await call.wait_for("session.created")
        _say(call, "My name is Ada.")
        await call.wait_for("output_audio_buffer.stopped", timeout=10)
    except BaseException:
        await call.close()
        raise
    return call


def _created_items(record) -> list[tuple[str, str]]:
    items = [e["item"] for e in record.received if e.get("type") == "conversation.item.create"]
    return [(i["role"], i["content"][0]["text"]) for i in items]


def _session_updates(record) -> list[dict]:
    return [e["session"] for e in record.received if e.get("type") == "session.update"]


@pytest.fixture
async def served(simulator):
    """Start the relay with given settings; cleaned up after the test."""
    runners = []

    async def serve(query: str = "", **settings):
        app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime" + query,
                                                      **(FAST_RETRIES | {"client_session_fields": "*"} | settings)))
        runners.append(runner)
        return app, url

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("abruptly", [True, False], ids=["network-loss-1006", "server-close-1011"])
async def test_an_upstream_dropped_mid_reply_is_replaced_and_the_next_turn_has_the_history(simulator, served, abruptly):
    simulator.reconfigure(close_after_event_type="response.output_audio_transcript.delta", close_abruptly=abruptly)
    app, url = await served()
    call = await call_relay(url, session=SESSION)
    simulator.reconfigure(close_after_event_type=None)  # the sessions that follow are sound
    try:
        await call.wait_for("session.created")
        _say(call, "My name is Ada.")
        reconnecting = await call.wait_for("relay.upstream.reconnecting", timeout=10)
        assert reconnecting["reason"] == ("connection closed (1006)" if abruptly else "connection closed (1011)")
        lost = await call.wait_for("response.done")  # the relay ends the reply its session took away
        assert lost["response"]["status"] == "failed"
        assert lost["response"]["status_details"]["error"]["code"] == "upstream_lost"
        reconnected = await call.wait_for("relay.upstream.reconnected", timeout=10)
        assert reconnected["attempt"] == 1 and reconnected["replayed_items"] == 2

        second = simulator.recorder.sessions[-1]
        # The new session got the configuration and the conversation so far: the user's words and the words of
        # the reply that had arrived.
        assert any(update.get("instructions") == "Be brief." and
                   update["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
                   for update in _session_updates(second))
        for event in second.received:  # what the relay sends a new session is valid GA input (strictly)
            if event.get("type") != "input_audio_buffer.append":
                check_client_event(event)
        replayed = _created_items(second)
        assert replayed[0] == ("user", "My name is Ada.")
        assert replayed[1][0] == "assistant" and "You said: My name is Ada.".startswith(replayed[1][1])
        assert replayed[1][1]

        # The next turn, spoken, works on the new session.
        after = len(call.events)
        call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
        done = await call.wait_for("response.done", timeout=20, after=after)
        assert done["response"]["status"] == "completed"
        await call.wait_for("output_audio_buffer.stopped", timeout=20, after=after)
        assert "error" not in call.types()
        assert app[CALLS][call.call_id].upstream.reconnects == 1
    finally:
        await call.close()


async def test_a_refused_key_at_reconnect_ends_the_call_with_the_error_and_no_more_attempts(simulator, served):
    app, url = await served("&sim_close_after_s=1")
    call = await call_relay(url)
    simulator.reconfigure(reject_auth=True)
    try:
        await call.wait_for("relay.upstream.reconnecting", timeout=10)
        error = await call.wait_for("error", timeout=10)
        assert error["error"]["code"] == "upstream_refused" and "invalid_api_key" in error["error"]["message"]
        await _ended(Relay(app, url, simulator), call.call_id)
        assert len(simulator.recorder.sessions) == 2  # the refusal is not retried
    finally:
        await call.close()


async def test_a_fatal_close_code_is_not_retried(simulator, served):
    app, url = await served("&sim_close_after_s=1&sim_close_code=3000")
    call = await call_relay(url)
    try:
        error = await call.wait_for("error", timeout=10)
        assert error["error"]["code"] == "upstream_closed" and "3000" in error["error"]["message"]
        await _ended(Relay(app, url, simulator), call.call_id)
        assert "relay.upstream.reconnecting" not in call.types()
        assert len(simulator.recorder.sessions) == 1
    finally:
        await call.close()


async def test_after_the_retries_the_call_ends_cleanly(simulator, served):
    app, url = await served("&sim_close_after_s=1", upstream_retries="3")
    call = await call_relay(url)
    simulator.reconfigure(close_after_event_type="session.created", close_abruptly=True)  # every attempt fails
    try:
        await call.wait_for("relay.upstream.reconnecting", timeout=10)
        error = await call.wait_for("error", timeout=15)
        assert error["error"]["code"] == "upstream_unavailable" and "3 attempts" in error["error"]["message"]
        await _ended(Relay(app, url, simulator), call.call_id)
        assert len(simulator.recorder.sessions) == 1 + 3
        assert "relay.upstream.reconnected" not in call.types()
    finally:
        await call.close()
    await simulator.recorder.wait_for(lambda: all(r.ended_at for r in simulator.recorder.sessions))


async def test_a_session_near_its_expiry_is_rolled_over_at_a_quiet_moment_with_continuous_rtp(simulator, served):
    app, url = await served("&sim_max_session_s=6", rollover_before_s="4")
    call = await _call_with_a_first_turn(url)
    try:
        rolled = await call.wait_for("relay.upstream.rolled_over", timeout=10)
        assert rolled["replayed_items"] == 2
        old, new = simulator.recorder.sessions[-2], simulator.recorder.sessions[-1]
        said = _created_items(old)[0][1]
        assert _created_items(new) == [("user", said), ("assistant", "You said: My name is Ada.")]
        await simulator.recorder.wait_for(lambda: old.ended_at)
        assert "error" not in old.sent_types  # replaced before it expired
        # The conversation goes on in the new session.
        after = len(call.events)
        _say(call, "What is my name?")
        done = await call.wait_for("response.done", timeout=10, after=after)
        assert done["response"]["status"] == "completed"
        await call.wait_for("output_audio_buffer.stopped", timeout=10, after=after)
        assert new.received.index(next(e for e in new.received if e.get("type") == "response.create")) > 2
        # One outbound stream across the switch: every frame 20 ms after the one before in RTP time.
        steps = np.diff(np.array(call.audio_pts, dtype=np.int64))
        assert len(call.audio_pts) > 100 and set(steps.tolist()) == {960}
        assert "error" not in call.types() and "relay.upstream.reconnecting" not in call.types()
    finally:
        await call.close()


async def test_an_expired_session_is_replaced_and_the_client_never_sees_the_expiry(simulator, served):
    app, url = await served("&sim_max_session_s=2", rollover_before_s="0")
    call = await _call_with_a_first_turn(url)
    try:
        reconnecting = await call.wait_for("relay.upstream.reconnecting", timeout=10)
        assert reconnecting["reason"] == "session_expired"
        await call.wait_for("relay.upstream.reconnected", timeout=10)
        assert simulator.recorder.sessions[0].sent_types[-1] == "error"  # it did expire
        assert _created_items(simulator.recorder.sessions[1])[0] == ("user", "My name is Ada.")
        after = len(call.events)
        _say(call, "What is my name?")
        done = await call.wait_for("response.done", timeout=10, after=after)
        assert done["response"]["status"] == "completed"
        assert "error" not in call.types()
    finally:
        await call.close()


async def test_what_a_client_sends_during_a_reconnect_reaches_the_new_session_once(simulator, served):
    simulator.reconfigure(close_after_s=1.0)
    app, url = await served(upstream_retry_backoff_s="1")
    call = await call_relay(url, session=SESSION)
    simulator.reconfigure(close_after_s=None, close_after_event_type="session.created")  # the first attempt fails
    try:
        await call.wait_for("relay.upstream.reconnecting", timeout=10)
        call.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Said during the outage."}]}})
        await simulator.recorder.wait_for(lambda: len(simulator.recorder.sessions) == 2)
        simulator.reconfigure(close_after_event_type=None)  # the second attempt, a second later, succeeds
        reconnected = await call.wait_for("relay.upstream.reconnected", timeout=10)
        assert reconnected["attempt"] == 2
        call.send({"type": "response.create"})
        done = await call.wait_for(lambda e: e["type"] == "response.done"
                                   and e["response"]["status"] == "completed", timeout=10)
        assert done["response"]["output"][0]["content"][0]["transcript"] == "You said: Said during the outage."
        new = simulator.recorder.sessions[-1]
        assert _created_items(new) == [("user", "Said during the outage.")]
        assert [e["type"] for e in new.received].count("response.create") == 1
    finally:
        await call.close()


async def test_a_rollover_waits_when_the_client_changes_the_session_while_the_next_is_prepared(simulator, served):
    app, url = await served("&sim_max_session_s=10", rollover_before_s="6")
    call = await call_relay(url, session=SESSION)
    simulator.reconfigure(stall_after_events=0, stall_s=1.5)  # the next session is slow to open
    try:
        await call.wait_for("session.created")
        await simulator.recorder.wait_for(lambda: len(simulator.recorder.sessions) == 2, timeout=10)
        call.send({"type": "session.update", "session": {"type": "realtime", "instructions": "Speak French."}})
        await call.wait_for(lambda e: e["type"] == "session.updated" and e["session"]["instructions"] == "Speak French.")
        simulator.reconfigure(stall_after_events=0, stall_s=0.0)
        await call.wait_for("relay.upstream.rolled_over", timeout=10)
        prepared_first, switched_to = simulator.recorder.sessions[1], simulator.recorder.sessions[-1]
        assert len(simulator.recorder.sessions) == 3 and prepared_first.ended_at  # the first one was dropped
        assert any(update.get("instructions") == "Speak French." for update in _session_updates(switched_to))
        assert app[CALLS][call.call_id].core.session["instructions"] == "Speak French."
    finally:
        await call.close()
