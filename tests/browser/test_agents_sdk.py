"""OpenAI's browser SDK, `@openai/agents-realtime` (pinned, bundled from npm), in Debian's Chromium on a page of
another loopback origin, against `relay serve` with API keys and the default event policy: the app changes only the
URL of the calls endpoint (see agents_sdk.py). Each test is one visitor: the backend mints a client secret, the page
connects with it."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.audio_checks import loud_ms
from tests.browser.agents_sdk import CALLS_URL, LOCKED_INSTRUCTIONS, SdkPage, sdk_pages

# Interrupt the first reply that starts playing, at once (in the page, not a round trip away: the SDK cancels only
# a response still in progress). Resolves with the number of events the app had seen by then.
INTERRUPT_WHEN_AUDIO_STARTS = """() => new Promise((resolve) => {
  const session = window.sdkApp.session;
  const onEvent = (event) => {
    if (event.type !== 'output_audio_buffer.started') return;
    session.off('transport_event', onEvent);
    session.interrupt();
    resolve(window.sdkApp.events.length);
  };
  session.on('transport_event', onEvent);
})"""


@pytest.fixture
async def quiet_page(sdk_stack):
    """A visitor whose microphone is silent: no turn starts unless the test asks."""
    async with sdk_pages(sdk_stack, sdk_stack.silent_wav) as open_page:
        yield await open_page()


@pytest.fixture
async def talking_page(sdk_stack):
    """A visitor who says "hello" every few seconds."""
    async with sdk_pages(sdk_stack, sdk_stack.mic_wav) as open_page:
        yield await open_page()


def _types(events: list[dict]) -> list[str]:
    return [event["type"] for event in events]


async def _no_failures(page: SdkPage) -> None:
    events = await page.events()
    assert await page.errors() == []  # nothing reached the app as an error
    assert "error" not in _types(events), [e for e in events if e["type"] == "error"]
    assert page.console == []  # e.g. the SDK's "Timed out waiting for session.updated ack"


async def test_realtime_session_connects_cross_origin_under_the_default_policy(quiet_page, sdk_stack,
                                                                               record_property):
    page = quiet_page
    offers = []
    page.page.on("request", lambda request: offers.append(request) if request.url == CALLS_URL else None)
    await page.connect()
    connect_ms = await page.connect_ms()
    record_property("sdk_connect_ms", connect_ms)
    print(f"SDK connect, click -> session.updated: {connect_ms:.0f} ms")

    # Cross-origin, with a header only a preflight can allow, and the client secret.
    assert await page.page.evaluate("location.origin") != sdk_stack.relay_url
    assert "x-openai-agents-sdk" in offers[0].headers
    assert offers[0].headers["authorization"].startswith("Bearer ek_")

    # connect() resolved on the relay's session.updated (the SDK did not wait out its timeout), and the fields the
    # backend locked were kept and said so, not refused.
    await _no_failures(page)
    events = await page.events()
    types = _types(events)
    assert types[0] == "session.created"
    kept = next(e for e in events if e["type"] == "relay.policy.fields_kept")
    assert "session.instructions" in kept["params"]
    assert types.index("relay.policy.fields_kept") < types.index("session.updated")
    session = next(e for e in events if e["type"] == "session.updated")["session"]
    assert session["instructions"] == LOCKED_INSTRUCTIONS
    assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"  # the SDK's own settings applied
    assert session["audio"]["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"
    assert [tool["name"] for tool in session["tools"]] == ["get_weather"]

    # The upstream got the SDK's settings without the locked fields.
    session_id = await sdk_stack.live_session()
    received = await sdk_stack.received_until(session_id, lambda events: any(
        "audio" in e.get("session", {}) for e in events))
    from_sdk = next(e["session"] for e in received if "audio" in e.get("session", {}))
    assert "instructions" not in from_sdk and from_sdk["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}

    # The SDK's close() (it sends no hangup, it closes the peer connection) ends the call upstream too; the same
    # client secret connects again (OpenAI's are good for any number of calls until they expire).
    await page.disconnect()
    for _ in range(100):
        if next(s for s in sdk_stack.sim_sessions() if s["session_id"] == session_id)["ended_at"] is not None:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the call outlived the SDK's close()")
    await page.connect()
    assert len(offers) == 2
    await _no_failures(page)


async def test_a_spoken_turn(talking_page, sdk_stack):
    page = talking_page
    await page.connect()
    done = await page.wait_for_event("response.done")
    await page.wait_for_event("output_audio_buffer.stopped")
    events = await page.events()
    types = _types(events)
    for expected in ["input_audio_buffer.speech_started", "input_audio_buffer.committed", "response.created",
                     "output_audio_buffer.started", "response.output_audio.done"]:
        assert types.index(expected) < types.index("response.done"), expected
    assert done["response"]["status"] == "completed"
    transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
    assert transcript.startswith("echo of ")
    assert {"agent_start", "audio_stopped", "agent_end"} <= set(await page.session_events())
    roles = await page.page.evaluate("window.sdkApp.session.history.map((item) => item.role)")
    assert "user" in roles and "assistant" in roles
    await _no_failures(page)

    session_id = await sdk_stack.live_session()
    assert loud_ms(sdk_stack.sim_audio(session_id), rate=24000)  # the user's speech reached the upstream


async def test_interrupt_cancels_and_clears(talking_page, sdk_stack):
    page = talking_page
    await page.connect()
    seen = await asyncio.wait_for(page.page.evaluate(INTERRUPT_WHEN_AUDIO_STARTS), 60)
    cleared = await page.wait_for_event("output_audio_buffer.cleared", since=seen)
    cancelled = await page.wait_for_event("response.done", since=seen)
    assert cancelled["response"]["status"] == "cancelled"
    assert cleared["response_id"] == cancelled["response"]["id"]
    session_id = await sdk_stack.live_session()
    received = _types(await sdk_stack.received_until(session_id, lambda events: "response.cancel" in _types(events)))
    assert "response.cancel" in received

    # The SDK's history holds the reply as far as it was heard: the relay truncated it (some audio had played),
    # and the SDK fetched the cut item (conversation.item.retrieve) when told.
    truncated = await page.wait_for_event("conversation.item.truncated", since=seen)
    await page.until(lambda e: e["type"] == "conversation.item.retrieved" and e["item"]["id"] == truncated["item_id"],
                     since=seen)
    item = await page.page.evaluate("(id) => window.sdkApp.session.history.find((i) => i.itemId === id)",
                                    truncated["item_id"])
    assert item["status"] == "incomplete"
    assert item["content"][0]["transcript"] == f"echo of {truncated['audio_end_ms'] / 1000:.2f} s"

    # The SDK's state is right: the next turn is answered in full, and nothing was an error.
    completed = await page.until(lambda e: e["type"] == "response.done" and e["response"]["status"] == "completed",
                                 since=seen, timeout=60)
    assert completed["response"]["id"] != cancelled["response"]["id"]
    await _no_failures(page)


async def test_a_function_tool_round_trip_through_the_sdk(quiet_page, sdk_stack):
    page = quiet_page
    await page.connect()
    await page.page.evaluate("""window.sdkApp.session.sendMessage('get_weather {"city": "Paris"}')""")
    call = await page.wait_for_event("response.function_call_arguments.done")
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    reply = await page.until(lambda e: e["type"] == "response.output_audio_transcript.done"
                             and e["transcript"].startswith("The tool returned"))
    assert reply["transcript"] == "The tool returned: sunny in Paris, 21 degrees"
    assert await page.page.evaluate("window.sdkApp.toolCalls") == [{"city": "Paris"}]
    assert {"agent_tool_start", "agent_tool_end"} <= set(await page.session_events())
    await _no_failures(page)

    # The simulator got the SDK's function_call_output for that call, then the SDK's response.create.
    session_id = await sdk_stack.live_session()
    received = sdk_stack.sim_events(session_id)
    at = [i for i, e in enumerate(received) if e.get("item", {}).get("type") == "function_call_output"]
    assert len(at) == 1
    output = received[at[0]]["item"]
    assert (output["call_id"], output["output"]) == (call["call_id"], "sunny in Paris, 21 degrees")
    assert "response.create" in _types(received[at[0]:])
