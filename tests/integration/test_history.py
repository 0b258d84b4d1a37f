"""A call's transcript and usage over real calls: the simulator upstream, an aiortc client, the relay's app."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.audio_checks import tone
from tests.integration.test_webrtc_call import HELLO48, Relay, _ended, _serve, relay_settings
from tests.webrtc_client import call_relay, silence48

@pytest.fixture
async def relay(simulator):
    app, runner, url = await _serve(relay_settings(simulator.url + "?model=gpt-realtime"))
    yield Relay(app, url, simulator)
    await runner.cleanup()


TRANSCRIBED = {"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}


async def _get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def test_the_transcript_holds_both_sides_and_the_usage_live_after_and_from_the_log(simulator, tmp_path):
    settings = relay_settings(simulator.url + "?model=gpt-realtime", history_dir=str(tmp_path / "history"))
    app, runner, url = await _serve(settings)
    try:
        call = await call_relay(url, session=TRANSCRIBED)
        try:
            await call.wait_for("session.created")
            call.mic.say_between(HELLO48, lead_ms=300, tail_ms=1200)
            usage_event = await call.wait_for("relay.usage", timeout=20)
            await call.wait_for("conversation.item.input_audio_transcription.completed", timeout=10)
            status, live = await _get(f"{url}/v1/realtime/calls/{call.call_id}/transcript")
            assert status == 200 and live["status"] == "active"
            user = next(e for e in live["entries"] if e["role"] == "user")
            heard = next(e["transcript"] for e in call.events
                         if e["type"] == "conversation.item.input_audio_transcription.completed")
            assert user["text"] == heard
            reply = next(e for e in live["entries"] if e["role"] == "assistant" and e["type"] == "message")
            spoken = next(e["transcript"] for e in call.events if e["type"] == "response.output_audio_transcript.done")
            assert reply["text"] == spoken and reply["audio"] is True
            done = next(e for e in call.events if e["type"] == "response.done")
            assert usage_event["response_id"] == done["response"]["id"]
            assert live["usage"]["responses"] == 1 and live["usage"]["cost_usd"] == usage_event["total"]["cost_usd"] > 0
        finally:
            await call.close()
        await _ended(Relay(app, url, simulator), call.call_id)
        status, ended = await _get(f"{url}/v1/realtime/calls/{call.call_id}/transcript")
        assert status == 200 and ended["status"] == "ended" and ended["entries"] == live["entries"]
        lines = [json.loads(line) for line in (tmp_path / "history" / f"{call.call_id}.jsonl").read_text().splitlines()]
        assert [line["seq"] for line in lines] == list(range(len(lines)))
    finally:
        await runner.cleanup()

    # Another relay process with the same directory answers from the log.
    app, runner, url = await _serve(settings)
    try:
        status, logged = await _get(f"{url}/v1/realtime/calls/{call.call_id}/transcript")
        assert status == 200 and logged["entries"] == ended["entries"] and logged["usage"] == ended["usage"]
        for bad in ("rtc_unknown", "rtc_..%2F..%2Fetc"):
            status, body = await _get(f"{url}/v1/realtime/calls/{bad}/transcript")
            assert status == 404 and body["error"]["code"] == "call_not_found"
    finally:
        await runner.cleanup()


async def test_an_interrupted_reply_is_kept_as_heard(relay):
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        call.mic.say(silence48(400))
        call.mic.say(tone(1500))
        call.mic.say(silence48(600))
        await call.wait_for("output_audio_buffer.started", timeout=20)
        await asyncio.sleep(1.0)
        call.mic.say(tone(600, hz=660))  # the user talks over the reply
        truncated = await call.wait_for("relay.item.truncated", timeout=10)
        await call.wait_for(lambda e: e["type"] == "response.output_audio_transcript.done"
                            and e["item_id"] == truncated["item_id"], timeout=10)
        status, transcript = await _get(f"{relay.url}/v1/realtime/calls/{call.call_id}/transcript")
        reply = next(e for e in transcript["entries"] if e.get("item_id") == truncated["item_id"])
        assert reply["interrupted"] and reply["heard_ms"] == truncated["audio_end_ms"]
        assert len(reply["text"]) < len(reply["full_text"])
    finally:
        await call.close()
