"""The simulator's conversation behaviour, over a real WebSocket on loopback."""

from __future__ import annotations

import base64
import json
import time

from tests.helpers import (
    BYTES_PER_MS,
    audio_of,
    connect,
    load_pcm,
    ms_of,
    silence,
    without_deltas,
)

HELLO = load_pcm("speech_hello_24k.wav")
WEATHER = load_pcm("speech_weather_24k.wav")
ONE_TURN = [
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "conversation.item.added",
    "conversation.item.done",
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "conversation.item.done",
    "response.output_item.done",
    "response.done",
    "rate_limits.updated",
]


async def test_session_created_first_with_expiry_and_defaults(url):
    async with connect(url) as client:
        event = await client.recv()
        assert event["type"] == "session.created"
        session = event["session"]
        assert session["model"] == "gpt-realtime"
        assert abs(session["expires_at"] - (time.time() + 3600)) < 60
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


async def test_session_update_merges_and_answers_with_the_whole_session(url):
    async with connect(url) as client:
        await client.until("session.created")
        session = await client.update(
            instructions="Be brief.",
            audio={"input": {"turn_detection": {"type": "server_vad", "threshold": 0.7}}},
        )
        assert session["instructions"] == "Be brief."
        assert session["audio"]["output"]["voice"] == "marin"  # untouched fields stay
        vad = session["audio"]["input"]["turn_detection"]
        assert vad == {
            "type": "server_vad",
            "threshold": 0.7,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
            "create_response": True,
            "interrupt_response": True,
            "idle_timeout_ms": None,
        }
        session = await client.update(audio={"input": {"turn_detection": None}})
        assert session["audio"]["input"]["turn_detection"] is None
        assert session["instructions"] == "Be brief."


async def test_session_update_errors_leave_the_session_unchanged(url):
    async with connect(url) as client:
        await client.until("session.created")
        bad = [
            ({"type": "realtime", "instructions": "x", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
            (
                {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}},
                "decimal_above_max_value",
                "session.audio.input.turn_detection.threshold",
            ),
            ({"type": "realtime", "output_modalities": ["smell"]}, "invalid_value", "session.output_modalities[0]"),
            ({"instructions": "x"}, "missing_required_parameter", "session.type"),
        ]
        for number, (session, code, param) in enumerate(bad):
            await client.send({"type": "session.update", "event_id": f"evt_{number}", "session": session}, check=False)
            error = await client.error()
            assert (error["code"], error["param"], error["event_id"]) == (code, param, f"evt_{number}")
        session = await client.update()
        assert session["instructions"] != "x"


async def test_voice_turn_with_server_vad_echoes_the_committed_speech(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(audio={"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}})
        lead_ms = 600
        await client.append(silence(lead_ms) + HELLO + silence(1000))
        events = await client.collect("rate_limits.updated")
        assert without_deltas([e for e in events if "transcription" not in e["type"]]) == ONE_TURN

        started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
        # espeak's first sound comes within a few tens of ms of the file's start; 300 ms prefix padding.
        assert lead_ms - 300 <= started["audio_start_ms"] <= lead_ms - 300 + 100
        assert stopped["audio_end_ms"] <= lead_ms + ms_of(HELLO) + 500 + 20
        assert stopped["item_id"] == started["item_id"]

        user_item = next(e for e in events if e["type"] == "conversation.item.added")["item"]
        assert user_item["id"] == started["item_id"] and user_item["role"] == "user"
        committed_ms = stopped["audio_end_ms"] - started["audio_start_ms"]

        done = next(e for e in events if e["type"] == "response.done")["response"]
        assert done["status"] == "completed"
        assert done["usage"]["output_token_details"]["audio_tokens"] == committed_ms // 50
        assistant = done["output"][0]
        echoed = audio_of(events, assistant["id"])
        assert len(echoed) == committed_ms * BYTES_PER_MS
        assert echoed == (silence(lead_ms) + HELLO + silence(1000))[
            started["audio_start_ms"] * BYTES_PER_MS : stopped["audio_end_ms"] * BYTES_PER_MS
        ]
        transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
        assert transcript == f"echo of {committed_ms / 1000:.2f} s"
        assert assistant["content"][0]["transcript"] == transcript

        transcription = await client.seen("conversation.item.input_audio_transcription.completed")
        assert transcription["item_id"] == user_item["id"]
        assert transcription["transcript"] == f"[speech {committed_ms / 1000:.2f} s]"


async def test_two_utterances_make_two_turns(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(audio={"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}})
        await client.append(silence(300) + HELLO + silence(2000) + WEATHER + silence(1000))
        await client.until("rate_limits.updated")
        await client.until("rate_limits.updated")
        starts = [e for e in client.events if e["type"] == "input_audio_buffer.speech_started"]
        assert len(starts) == 2
        assert starts[1]["audio_start_ms"] > 300 + ms_of(HELLO)


async def test_semantic_vad_detects_turns_like_server_vad(url):
    async with connect(url) as client:
        await client.until("session.created")
        session = await client.update(audio={"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}})
        assert session["audio"]["input"]["turn_detection"]["eagerness"] == "high"
        await client.append(silence(300) + HELLO + silence(1000))
        events = await client.collect("rate_limits.updated")
        assert without_deltas(events) == ONE_TURN


async def test_manual_turns_commit_and_response_create(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(audio={"input": {"turn_detection": None}})
        await client.append(HELLO)
        await client.send({"type": "input_audio_buffer.commit"})
        committed = await client.until("input_audio_buffer.committed")
        item = (await client.until("conversation.item.done"))["item"]
        assert item["id"] == committed["item_id"]
        await client.send({"type": "response.create"})
        events = await client.collect("response.done")
        assert audio_of(events) == HELLO
        assert not any(e["type"].startswith("input_audio_buffer.speech") for e in client.events)


async def test_commit_of_less_than_100_ms_is_an_error_and_clear_empties_the_buffer(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(audio={"input": {"turn_detection": None}})
        await client.append(silence(60))
        await client.send({"type": "input_audio_buffer.commit", "event_id": "evt_commit"})
        error = await client.error()
        assert (error["code"], error["event_id"]) == ("input_audio_buffer_commit_empty", "evt_commit")
        await client.append(silence(500))
        await client.send({"type": "input_audio_buffer.clear"})
        await client.until("input_audio_buffer.cleared")
        await client.send({"type": "input_audio_buffer.commit"})
        assert (await client.error())["code"] == "input_audio_buffer_commit_empty"


async def test_barge_in_cancels_the_active_response(simulator):
    # Real-time generation, so the response is still being generated when the user speaks again.
    async with connect(simulator.url + "?sim_speed=1") as client:
        await client.until("session.created")
        await client.append(silence(300) + WEATHER + silence(700))
        response_id = (await client.until("response.created"))["response"]["id"]
        await client.until("response.output_audio.delta")
        await client.append(HELLO)
        started = await client.until("input_audio_buffer.speech_started")
        done = await client.until("response.done")
        assert done["response"]["id"] == response_id
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
        assert done["response"]["output"][0]["status"] == "incomplete"
        events = client.events
        assert events.index(started) < events.index(done)
        partial = audio_of(events, done["response"]["output"][0]["id"])
        assert 0 < len(partial) < ms_of(WEATHER) * BYTES_PER_MS
        # The conversation goes on: the interrupting speech gets its own turn.
        await client.append(silence(800))
        assert (await client.until("response.done"))["response"]["status"] == "completed"


async def test_response_cancel_and_active_response_errors(simulator):
    async with connect(simulator.url + "?sim_speed=1") as client:
        await client.until("session.created")
        await client.send({"type": "response.cancel", "event_id": "evt_idle"})
        error = await client.error()
        assert (error["code"], error["event_id"]) == ("response_cancel_not_active", "evt_idle")
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "tell me a long story about relays and codecs"}]}})
        await client.send({"type": "response.create"})
        created = await client.until("response.created")
        await client.send({"type": "response.create"})
        assert (await client.error())["code"] == "conversation_already_has_active_response"
        await client.send({"type": "response.cancel", "response_id": created["response"]["id"]})
        done = await client.until("response.done")
        assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}


async def _echo_reply(client, pcm: bytes) -> dict:
    """A manual turn with `pcm`; returns the completed assistant item."""
    await client.update(audio={"input": {"turn_detection": None}})
    await client.append(pcm)
    await client.send({"type": "input_audio_buffer.commit"})
    await client.send({"type": "response.create"})
    return (await client.until("response.done"))["response"]["output"][0]


async def test_truncate_cuts_audio_and_transcript(url):
    async with connect(url) as client:
        await client.until("session.created")
        item = await _echo_reply(client, HELLO)
        await client.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0, "audio_end_ms": 500})
        truncated = await client.until("conversation.item.truncated")
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item["id"], 500)
        await client.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
        retrieved = (await client.until("conversation.item.retrieved"))["item"]
        assert len(base64.b64decode(retrieved["content"][0]["audio"])) == 500 * BYTES_PER_MS
        assert retrieved["content"][0]["transcript"] == "echo of 0.50 s"


async def test_truncate_errors_use_the_service_codes(url):
    async with connect(url) as client:
        await client.until("session.created")
        item = await _echo_reply(client, HELLO)
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
        text_item = (await client.until("conversation.item.done"))["item"]
        user_audio = next(e["item"] for e in client.events if e["type"] == "conversation.item.done" and e["item"]["role"] == "user")
        cases = [
            ({"item_id": "item_nope", "audio_end_ms": 100}, "item_truncate_invalid_item_id"),
            ({"item_id": text_item["id"], "audio_end_ms": 100}, "unsupported_content_type"),
            ({"item_id": user_audio["id"], "audio_end_ms": 100}, "invalid_value"),  # only assistant audio
            ({"item_id": item["id"], "audio_end_ms": ms_of(HELLO) + 1}, "invalid_value"),
            ({"item_id": item["id"], "audio_end_ms": 0}, "invalid_value"),
        ]
        for fields, code in cases:
            await client.send({"type": "conversation.item.truncate", "content_index": 0, **fields})
            assert (await client.error())["code"] == code, fields
        # An assistant message with text only has no audio to cut.
        await client.update(output_modalities=["text"])
        await client.send({"type": "response.create"})
        text_reply = (await client.until("response.done"))["response"]["output"][0]
        await client.send({"type": "conversation.item.truncate", "item_id": text_reply["id"], "content_index": 0, "audio_end_ms": 10})
        assert (await client.error())["code"] == "unsupported_content_type"


async def test_items_create_retrieve_delete(url):
    async with connect(url) as client:
        await client.until("session.created")
        first = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "one"}], "id": "item_first"}
        await client.send({"type": "conversation.item.create", "item": first})
        added = await client.until("conversation.item.added")
        assert added["previous_item_id"] is None and added["item"]["id"] == "item_first"
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "two"}]}})
        second = (await client.until("conversation.item.added"))
        assert second["previous_item_id"] == "item_first"
        await client.send({"type": "conversation.item.create", "previous_item_id": "item_first", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "between"}]}})
        between = await client.until("conversation.item.added")
        assert between["previous_item_id"] == "item_first"
        await client.send({"type": "conversation.item.create", "item": first}, check=False)
        assert (await client.error())["code"] == "invalid_value"  # the id exists
        await client.send({"type": "conversation.item.retrieve", "item_id": "item_first"})
        assert (await client.until("conversation.item.retrieved"))["item"]["content"][0]["text"] == "one"
        await client.send({"type": "conversation.item.delete", "item_id": "item_first"})
        assert (await client.until("conversation.item.deleted"))["item_id"] == "item_first"
        await client.send({"type": "conversation.item.retrieve", "item_id": "item_first"})
        assert (await client.error())["code"] == "item_retrieve_invalid_item_id"
        await client.send({"type": "conversation.item.delete", "item_id": "item_first"})
        assert (await client.error())["code"] == "item_delete_invalid_item_id"


async def test_text_modality_answers_in_text(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(output_modalities=["text"])
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}})
        await client.send({"type": "response.create"})
        events = await client.collect("response.done")
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        done = next(e for e in events if e["type"] == "response.output_text.done")
        assert deltas == done["text"] == "You said: hello there"
        assert not any(e["type"].startswith("response.output_audio") for e in events)


async def test_text_message_gets_a_spoken_reply_in_audio_modality(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}})
        await client.send({"type": "response.create", "response": {"metadata": {"turn": "7"}}})
        events = await client.collect("response.done")
        transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
        assert transcript == "You said: hello there"
        assert ms_of(audio_of(events)) == 4 * (220 + 60)  # one tone burst and gap per word
        assert events[-1]["response"]["metadata"] == {"turn": "7"}


async def test_max_output_tokens_cuts_the_reply(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(max_output_tokens=10)
        item = await _echo_reply(client, HELLO)
        done = next(e for e in client.events if e["type"] == "response.done")["response"]
        assert done["status"] == "incomplete"
        assert done["status_details"]["reason"] == "max_output_tokens"
        assert ms_of(audio_of(client.events, item["id"])) == 10 * 50


async def test_voice_cannot_change_once_assistant_audio_exists(url):
    async with connect(url) as client:
        await client.until("session.created")
        assert (await client.update(audio={"output": {"voice": "cedar"}}))["audio"]["output"]["voice"] == "cedar"
        await _echo_reply(client, HELLO)
        await client.send({"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}}})
        assert (await client.error())["code"] == "cannot_update_voice"


async def test_function_calling_round_trip(url):
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(tools=[tool])
        text = 'Please call get_weather with {"city": "Paris"}'
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        await client.send({"type": "response.create"})
        events = await client.collect("response.done")
        args_done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
        assert args_done["name"] == "get_weather"
        assert json.loads(args_done["arguments"]) == {"city": "Paris"} and deltas == args_done["arguments"]
        call = events[-1]["response"]["output"][0]
        assert (call["type"], call["call_id"], call["status"]) == ("function_call", args_done["call_id"], "completed")
        await client.send({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": call["call_id"], "output": '{"sky": "sunny"}'}})
        await client.send({"type": "response.create"})
        reply = await client.until("response.output_audio_transcript.done")
        assert reply["transcript"] == 'The tool returned: {"sky": "sunny"}'


async def test_a_message_that_names_no_tool_gets_no_call(url):
    async with connect(url) as client:
        await client.until("session.created")
        await client.update(tools=[{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}])
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "good morning"}]}})
        await client.send({"type": "response.create"})
        events = await client.collect("response.done")
        assert events[-1]["response"]["output"][0]["type"] == "message"
        await client.send({"type": "response.create", "response": {"tool_choice": "required"}})
        events = await client.collect("response.done")
        assert events[-1]["response"]["output"][0]["name"] == "get_weather"
