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
        seqs = [line["seq"] for line in lines]  # an entry completed later (its transcription) is logged again
        assert sorted(set(seqs)) == list(range(len(ended["entries"])))
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


async def test_a_new_call_resumes_an_earlier_conversation_as_text(simulator, tmp_path):
    settings = relay_settings(simulator.url + "?model=gpt-realtime", history_dir=str(tmp_path))
    app, runner, url = await _serve(settings)
    try:
        first = await call_relay(url, session=TRANSCRIBED)
        try:
            await first.wait_for("session.created")
            first.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "My name is Ada."}]}})
            first.send({"type": "response.create"})
            await first.wait_for("relay.usage", timeout=15)
        finally:
            await first.close()
        await _ended(Relay(app, url, simulator), first.call_id)
        status, earlier = await _get(f"{url}/v1/realtime/calls/{first.call_id}/transcript")
        said = [(e["role"], e["text"]) for e in earlier["entries"] if e["type"] == "message"]
        assert said[0] == ("user", "My name is Ada.") and said[1][0] == "assistant"

        second = await call_relay(f"{url}", resume=first.call_id)
        try:
            await second.wait_for("session.created")
            replayed = await second.wait_for(lambda e: e["type"] == "conversation.item.done"
                                             and e["item"].get("role") == "assistant", timeout=10)
            assert replayed["item"]["content"][0]["text"] == said[1][1]
        finally:
            await second.close()
        # The new upstream session was given the conversation, in order, as text items.
        items = [e["item"] for e in simulator.recorder.sessions[-1].received if e.get("type") == "conversation.item.create"]
        assert [(i["role"], i["content"][0]["text"]) for i in items] == said
        status, resumed = await _get(f"{url}/v1/realtime/calls/{second.call_id}/transcript")
        assert [(e["role"], e["text"]) for e in resumed["entries"] if e["type"] == "message"][:2] == said
        assert resumed["entries"][0]["resumed_from"] == first.call_id and resumed["usage"]["responses"] == 0

        for unknown in ("rtc_nothingkept", "../etc/passwd"):
            with pytest.raises(AssertionError, match='relay answered 404: .*"param": "resume"'):
                await call_relay(url, resume=unknown)
    finally:
        await runner.cleanup()
