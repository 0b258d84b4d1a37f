"""Server-side tools over real calls: the relay runs its own tools, leaves the client's to the client."""

from __future__ import annotations

import asyncio
import json

import pytest

from relay.tools import Toolbox, ToolContext, ToolError
from tests.integration.test_webrtc_call import Relay, _ended, _serve, relay_settings
from tests.webrtc_client import call_relay


@pytest.fixture
async def relay(simulator):
    settings = relay_settings(simulator.url + "?model=gpt-realtime", tools="tests.tool_fixtures,relay.tools.examples",
                              tool_timeout_s="0.5", client_session_fields="*")  # clients bring tools of their own
    app, runner, url = await _serve(settings)
    yield Relay(app, url, simulator)
    await runner.cleanup()


def _say(call, text: str) -> None:
    call.send({"type": "conversation.item.create",
               "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    call.send({"type": "response.create"})


async def _reply_text(call, after: int) -> str:
    done = await call.wait_for(lambda e: e["type"] == "response.output_audio_transcript.done", after=after, timeout=15)
    return done["transcript"]


def _outputs(relay: Relay) -> dict[str, str]:
    return {e["item"]["call_id"]: e["item"]["output"] for e in relay.upstream_received()
            if e.get("type") == "conversation.item.create" and e["item"].get("type") == "function_call_output"}


async def test_the_relay_offers_runs_and_answers_its_tools(relay):
    call = await call_relay(relay.url)
    try:
        created = await call.wait_for("session.created")
        offered = {t["name"] for t in created["session"]["tools"]}
        assert offered == {"add", "forecast", "broken", "sluggish", "current_time", "end_call"}
        mark = len(call.events)
        _say(call, 'please add {"a": 2, "b": 3}')
        assert await _reply_text(call, mark) == "The tool returned: 5"
        mark = len(call.events)
        _say(call, 'forecast {"city": "Lyon", "days": 2}')  # a single pydantic parameter: its model is the schema
        reply = await _reply_text(call, mark)
        assert json.loads(reply.removeprefix("The tool returned: ")) == {
            "city": "Lyon", "days": 2, "call": call.call_id, "sky": "clear"}
        for text, expected in (("broken", "error: broken failed: RuntimeError: the tool broke"),
                               ("sluggish", "error: sluggish did not finish within 0.5 s"),
                               ('add {"a": "two"}', "error: invalid arguments for add")):
            mark = len(call.events)
            _say(call, text)
            assert (await _reply_text(call, mark)).startswith(f"The tool returned: {expected}")
        assert len(_outputs(relay)) == 5
        # The transcript has each call and output.
        kinds = [e["type"] for e in relay.calls[call.call_id].history.entries]
        assert kinds.count("function_call") == 5 and kinds.count("function_call_output") == 5
    finally:
        await call.close()


async def test_a_clients_own_tools_are_merged_and_left_to_the_client(relay):
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        mine = {"type": "function", "name": "open_door", "description": "Open the door.",
                "parameters": {"type": "object", "properties": {}}}
        clash = {"type": "function", "name": "add", "description": "The client's add.", "parameters": {"type": "object"}}
        call.send({"type": "session.update", "session": {"type": "realtime", "tools": [mine, clash]}})
        updated = await call.wait_for("session.updated")
        tools = {t["name"]: t for t in updated["session"]["tools"]}
        assert "open_door" in tools and tools["add"]["description"] == "Add two whole numbers."  # the relay's stays
        mark = len(call.events)
        _say(call, "open_door please")
        await call.wait_for(lambda e: e["type"] == "response.done", after=mark, timeout=15)
        args = await call.wait_for("response.function_call_arguments.done", after=mark)
        assert args["name"] == "open_door"
        await asyncio.sleep(0.5)
        assert args["call_id"] not in _outputs(relay)  # the client's to answer
        call.send({"type": "conversation.item.create",
                   "item": {"type": "function_call_output", "call_id": args["call_id"], "output": "opened"}})
        call.send({"type": "response.create"})
        assert await _reply_text(call, mark) == "The tool returned: opened"
    finally:
        await call.close()


async def test_end_call_hangs_up_after_the_goodbye(relay):
    call = await call_relay(relay.url)
    try:
        await call.wait_for("session.created")
        mark = len(call.events)
        _say(call, "end_call now")
        await _reply_text(call, mark)  # the model's answer to the tool's output plays first
        await _ended(relay, call.call_id, timeout=15)
        assert relay.calls.get(call.call_id) is None
        assert "output_audio_buffer.stopped" in call.types()[mark:]
    finally:
        await call.close()


def test_a_bad_tools_module_is_refused_with_its_reason():
    with pytest.raises(ToolError, match="cannot import tools module 'tests.no_such_module'"):
        Toolbox.load(["tests.no_such_module"])
    assert not Toolbox.load(["tests.tool_fixtures"]).owns("not_a_tool")


async def test_a_tool_schema_comes_from_its_hints():
    toolbox = Toolbox.load(["tests.tool_fixtures"])
    add = next(t for t in toolbox.definitions() if t["name"] == "add")
    assert add["parameters"]["required"] == ["a", "b"] and add["parameters"]["properties"]["a"]["type"] == "integer"
    forecast = next(t for t in toolbox.definitions() if t["name"] == "forecast")
    assert forecast["description"] == "The weather to come." and "context" not in json.dumps(forecast["parameters"])
    context = ToolContext("rtc_test", lambda: None)
    assert await toolbox.call("add", '{"a": 1, "b": 2}', context, 1) == "3"
    assert (await toolbox.call("add", "not json", context, 1)).startswith("error: invalid arguments")


async def test_a_result_that_is_not_json_becomes_an_error_output():
    import relay.tools as tools_module

    async def cyclic() -> dict:
        loop: dict = {}
        loop["self"] = loop
        return loop

    toolbox = Toolbox([tools_module.Tool(cyclic, "cyclic", "A structure that contains itself.")])
    output = await toolbox.call("cyclic", "{}", ToolContext("rtc_test", lambda: None), 1)
    assert output.startswith("error: cyclic returned a value that is not JSON")
