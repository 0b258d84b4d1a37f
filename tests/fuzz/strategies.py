"""Hypothesis strategies for Realtime events: shaped like the real ones often enough to get past the first checks,
wrong in every way the protocol allows otherwise."""

from __future__ import annotations

import base64
import json

from hypothesis import strategies as st

from relay.protocol.parse import CLIENT_EVENT_TYPES, SERVER_EVENT_TYPES

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
ids = st.sampled_from(["item_1", "item_2", "resp_1", "resp_2", "call_1", "call_srv", "", "evt_1"]) | st.text(max_size=8)
FIELDS = ["session", "response", "item", "item_id", "response_id", "call_id", "event_id", "audio_end_ms",
          "content_index", "output_index", "delta", "transcript", "text", "previous_item_id", "error", "audio", "name",
          "arguments", "part", "usage", "status"]
ITEM_TYPES = ["message", "function_call", "function_call_output", "item_reference", "x"]
ROLES = ["user", "assistant", "system", "developer"]


@st.composite
def items(draw):
    item = {"type": draw(st.sampled_from(ITEM_TYPES) | json_values), "id": draw(ids | json_values),
            "role": draw(st.sampled_from(ROLES) | json_values),
            "call_id": draw(ids | json_values),
            "name": draw(st.sampled_from(["get_weather", "current_time", "end_call", "x"]) | json_values),
            "output": draw(st.text(max_size=20)), "arguments": draw(st.text(max_size=20)),
            "content": draw(st.lists(st.fixed_dictionaries({
                "type": st.sampled_from(["input_text", "input_audio", "output_text", "output_audio", "text"]),
                "text": st.text(max_size=20), "transcript": st.none() | st.text(max_size=20)}), max_size=3)),
            "status": draw(st.sampled_from(["completed", "in_progress", "incomplete"]))}
    keep = draw(st.sets(st.sampled_from(sorted(item)), max_size=len(item)))
    return {k: v for k, v in item.items() if k in keep or k == "type"}


def sessions():
    return st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["realtime", "transcription", "x"]), "instructions": st.text(max_size=30),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": st.text(max_size=10)}), max_size=2)
        | json_values,
        "audio": st.fixed_dictionaries({}, optional={
            "input": st.fixed_dictionaries({}, optional={
                "format": json_values, "turn_detection": st.none() | st.fixed_dictionaries(
                    {"type": st.sampled_from(["server_vad", "semantic_vad"])},
                    optional={"interrupt_response": st.booleans() | json_values})}),
            "output": st.fixed_dictionaries({}, optional={"voice": st.text(max_size=8), "format": json_values})})
        | json_values,
        "output_modalities": json_values, "model": st.text(max_size=10), "tool_choice": json_values,
        "expires_at": st.integers(0, 2**40) | json_values,
    })


@st.composite
def events(draw, types: list[str]):
    event = {"type": draw(st.sampled_from(types) | st.text(max_size=12))}
    for name in draw(st.sets(st.sampled_from(FIELDS), max_size=6)):
        if name == "item":
            event[name] = draw(items() | json_values)
        elif name in ("session",):
            event[name] = draw(sessions() | json_values)
        elif name == "response":
            event[name] = draw(st.fixed_dictionaries({}, optional={
                "id": ids, "status": st.sampled_from(["completed", "cancelled", "failed"]),
                "output": st.lists(items(), max_size=3), "input": st.lists(items() | json_values, max_size=2),
                "instructions": st.text(max_size=10), "usage": json_values}) | json_values)
        elif name in ("item_id", "response_id", "call_id", "event_id"):
            event[name] = draw(ids | json_values)
        elif name == "delta":
            event[name] = draw(st.binary(max_size=2000).map(lambda b: base64.b64encode(b).decode())
                               | st.text(max_size=20) | json_values)
        else:
            event[name] = draw(json_values)
    return event


client_events = events(sorted(CLIENT_EVENT_TYPES))
server_events = events(sorted(SERVER_EVENT_TYPES))


def as_text(event_strategy):
    """The event's JSON, or text that is only nearly JSON."""
    return event_strategy.map(json.dumps) | st.text(max_size=60) | event_strategy.map(lambda e: json.dumps(e)[:-1])
