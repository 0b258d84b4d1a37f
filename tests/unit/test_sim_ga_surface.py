"""The simulator accepts the GA session surface: session updates made from the `openai` SDK's own types.

The session type (`RealtimeSessionCreateRequestParam`, TypedDicts) is walked two ways: systematically (every field,
every union arm, every Literal value, each in an otherwise minimal session) and at random with hypothesis (any mix
of fields). Each session the oracle accepts must be accepted by the simulator, come back in `session.updated`, and
every event that answers it must conform. The types say nothing of the ranges and rules the service documents in
their docstrings; DOCUMENTED and `documented_rules` hold those, so every session generated is one the service takes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import typing_extensions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.realtime import RealtimeSessionCreateRequestParam

from tests.fuzz.strategies import json_values
from tests.oracle import SESSION_MODELS, check_client_event
from tests.unit.test_sim_session_robustness import (
    errors, new_session, of_type, run_until_idle, send, update, user_text,
)

SESSION_TYPE = RealtimeSessionCreateRequestParam

# The values the service takes where the types say only "int", "float", "str" or "object": the ranges their
# docstrings give, and a plausible range where they give none (a number the types leave open must be listed here).
# By path; "[]" stands for any element of a list. Each: the hypothesis strategy, the values the systematic walk uses.
DOCUMENTED: dict[str, tuple[st.SearchStrategy, list[Any]]] = {
    "model": (st.sampled_from(SESSION_MODELS), list(SESSION_MODELS)),
    "max_output_tokens": (st.integers(1, 4096), [1, 4096]),
    "output_modalities": (st.sampled_from([["audio"], ["text"]]), [["audio"], ["text"]]),  # never both
    "audio.output.speed": (st.floats(0.25, 1.5), [0.25, 1.5]),
    "audio.input.noise_reduction.strength": (st.floats(0.0, 1.0), [0.0, 1.0]),
    "audio.input.turn_detection.threshold": (st.floats(0.0, 1.0), [0.0, 1.0]),
    "audio.input.turn_detection.prefix_padding_ms": (st.integers(0, 5000), [0, 5000]),
    "audio.input.turn_detection.silence_duration_ms": (st.integers(0, 5000), [0, 5000]),
    "audio.input.turn_detection.idle_timeout_ms": (st.integers(0, 60_000), [0, 60_000]),
    "truncation.retention_ratio": (st.floats(0.0, 1.0), [0.0, 1.0]),
    "truncation.token_limits.post_instructions": (st.integers(1, 28_224), [1, 28_224]),
    "tools[].parameters": (st.dictionaries(st.text(max_size=8), json_values, max_size=3), [{}, {"type": "object"}]),
}
SERVER_KEYS = ("server_url", "connector_id", "tunnel_id")


def documented_rules(session: dict[str, Any]) -> dict[str, Any]:
    """The rules the types cannot say: a function tool has a name, an MCP entry names its server."""
    for tool in session.get("tools", []):
        if tool.get("type") == "mcp" and not any(tool.get(key) for key in SERVER_KEYS):
            tool["server_url"] = "https://mcp.example.com/mcp"
        elif tool.get("type", "function") == "function":
            tool.setdefault("name", "lookup")
    return session


# --- the walk over the SDK's types ------------------------------------------------------------------------------------


def _fields(typed_dict: type) -> Iterator[tuple[str, Any, bool]]:
    """(key, type, required) of a TypedDict, Required/NotRequired read from its annotations."""
    for key, hint in typing_extensions.get_type_hints(typed_dict, include_extras=True).items():
        origin = get_origin(hint)
        required = origin is typing_extensions.Required
        if origin in (typing_extensions.Required, typing_extensions.NotRequired):
            (hint,) = get_args(hint)
        yield key, hint, required


def _unwrap(tp: Any) -> tuple[str, Any, tuple[Any, ...]]:
    """The kind of a type ("typeddict", "union", "literal", "list", "dict" or the type itself) and its args."""
    origin = get_origin(tp)
    if origin is typing_extensions.Annotated:
        return _unwrap(get_args(tp)[0])
    if typing_extensions.is_typeddict(tp):
        return "typeddict", tp, ()
    if origin is Union:
        return "union", tp, get_args(tp)
    if origin is Literal:
        return "literal", tp, get_args(tp)
    if origin in (list, Iterable, Sequence):  # SequenceNotStr is a Sequence
        return "list", tp, get_args(tp)
    if origin is dict:
        return "dict", tp, get_args(tp)
    return "scalar", tp, ()


def strategy(tp: Any, path: str = "") -> st.SearchStrategy:
    """Hypothesis values of `tp` at `path`: any the type allows, within what DOCUMENTED says."""
    if path in DOCUMENTED:
        return DOCUMENTED[path][0]
    kind, tp, args = _unwrap(tp)
    if kind == "typeddict":
        required, optional = {}, {}
        for key, hint, needed in _fields(tp):
            (required if needed else optional)[key] = strategy(hint, _join(path, key))
        return st.fixed_dictionaries(required, optional=optional)
    if kind == "union":
        return st.one_of([strategy(arm, path) for arm in args])
    if kind == "literal":
        return st.sampled_from(args)
    if kind == "list":
        return st.lists(strategy(args[0], path + "[]"), max_size=3)
    if kind == "dict":
        return st.dictionaries(st.text(max_size=8), strategy(args[1], path + "{}"), max_size=3)
    return _scalar(tp, path)


def variants(tp: Any, path: str = "") -> Iterator[Any]:
    """Values of `tp` at `path` that between them use every field, union arm and Literal value of the type once."""
    if path in DOCUMENTED:
        yield from DOCUMENTED[path][1]
        return
    kind, tp, args = _unwrap(tp)
    if kind == "typeddict":
        fields = list(_fields(tp))
        base = {key: next(variants(hint, _join(path, key))) for key, hint, needed in fields if needed}
        yield base
        for key, hint, _ in fields:
            for value in variants(hint, _join(path, key)):
                yield {**base, key: value}
    elif kind == "union":
        for arm in args:
            yield from variants(arm, path)
    elif kind == "literal":
        yield from args
    elif kind == "list":
        yield from ([value] for value in variants(args[0], path + "[]"))
    elif kind == "dict":
        yield from ({"name": value} for value in variants(args[1], path + "{}"))
    else:
        yield from _scalar_examples(tp, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _scalar(tp: Any, path: str) -> st.SearchStrategy:
    simple = {str: st.text(max_size=20), bool: st.booleans(), type(None): st.none(), object: json_values}
    if tp in simple:
        return simple[tp]
    raise AssertionError(f"{path}: a {tp} with no documented range in DOCUMENTED")  # a new numeric field: say its range


def _scalar_examples(tp: Any, path: str) -> list[Any]:
    examples = {str: ["", "x"], bool: [True, False], type(None): [None], object: [{"k": [1, "v"]}, "s", 3, None]}
    if tp in examples:
        return examples[tp]
    raise AssertionError(f"{path}: a {tp} with no documented range in DOCUMENTED")


# --- the check --------------------------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _contains(whole: Any, part: Any) -> bool:
    """Everything `part` says is in `whole` (which may say more: defaults the server filled in)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and _contains(whole[k], v) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(whole, list) and len(whole) == len(part) and all(map(_contains, whole, part))
    return whole == part


def _mcp_listed(out: list[dict[str, Any]]) -> dict[str, list[str]]:
    """server_label -> the tool names listed, from the events that followed session.updated, in their order."""
    types = [e["type"] for e in out]
    listed = {}
    for done in (e for e in out if e["type"] == "conversation.item.done"):
        item = done["item"]
        assert item["type"] == "mcp_list_tools"
        marks = [next(i for i, e in enumerate(out) if e.get("item_id") == item["id"] and e["type"] == t)
                 for t in ("mcp_list_tools.in_progress", "mcp_list_tools.completed")]
        added = next(i for i, e in enumerate(out) if e["type"] == "conversation.item.added" and e["item"]["id"] == item["id"])
        assert types.index("session.updated") < added < marks[0] < marks[1] < out.index(done)
        listed[item["server_label"]] = [tool["name"] for tool in item["tools"]]
    return listed


def _names(allowed: Any) -> list[str]:
    names = allowed.get("tool_names") if isinstance(allowed, dict) else allowed
    return list(dict.fromkeys(names or []))


def check_accepted(session: dict[str, Any]) -> None:
    """`session` conforms to the SDK's types; the simulator takes it whole and says so with conforming events."""
    session = documented_rules(session)
    update = {"type": "session.update", "session": session}
    check_client_event(update)
    out = send(new_session(), 0.0, **update)  # every event the simulator answers with is checked by the oracle
    assert out[0]["type"] == "session.updated", out[0]
    assert _contains(out[0]["session"], session), (session, out[0]["session"])
    servers = {t["server_label"]: t for t in session.get("tools", []) if t.get("type") == "mcp"}
    assert _mcp_listed(out) == {label: _names(t.get("allowed_tools")) for label, t in servers.items()}


# --- the tests --------------------------------------------------------------------------------------------------------

TOP_LEVEL = {key for key, _, _ in _fields(SESSION_TYPE)}
SYSTEMATIC = list({_json(v): v for v in variants(SESSION_TYPE)}.values())


def _literals(tp: Any, value: Any = None, path: str = "", walk_all: bool = False) -> set[tuple[str, str]]:
    """The (path, Literal value) pairs of the type tree: all of them (walk_all), or those `value` uses."""
    kind, tp, args = _unwrap(tp)
    if path in DOCUMENTED:
        return set()
    if kind == "literal":
        return {(path, _json(v)) for v in args if walk_all or v == value}
    if kind == "union":
        return set().union(*(_literals(arm, value, path, walk_all) for arm in args))
    if kind == "typeddict" and (walk_all or isinstance(value, dict)):
        fields = [(k, h) for k, h, _ in _fields(tp) if walk_all or k in value]
        return set().union(set(), *(_literals(h, None if walk_all else value[k], _join(path, k), walk_all) for k, h in fields))
    if kind in ("list", "dict"):
        inner = path + ("[]" if kind == "list" else "{}")
        if walk_all:
            return _literals(args[-1], None, inner, True)
        if isinstance(value, list if kind == "list" else dict):
            values = value if kind == "list" else value.values()
            return set().union(set(), *(_literals(args[-1], v, inner) for v in values))
    return set()


def test_the_systematic_walk_reaches_every_field_and_literal_value():
    assert len(SYSTEMATIC) > 150
    assert {key for session in SYSTEMATIC for key in session} == TOP_LEVEL
    used = set().union(*(_literals(SESSION_TYPE, session) for session in SYSTEMATIC))
    every = _literals(SESSION_TYPE, walk_all=True)
    assert len(every) > 50 and not every - used, sorted(every - used)


@pytest.mark.parametrize("session", SYSTEMATIC, ids=lambda s: _json(s)[:60])
def test_every_field_and_value_of_the_ga_session_type_is_accepted(session):
    check_accepted(copy.deepcopy(session))


def test_any_mix_of_ga_session_fields_is_accepted():
    seen: list[dict[str, Any]] = []

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy(SESSION_TYPE))
    def accepted(session: dict[str, Any]) -> None:
        seen.append(copy.deepcopy(session))
        check_accepted(session)

    accepted()
    distinct = {_json(documented_rules(s)) for s in seen}
    assert len(distinct) >= 250
    assert {key for s in seen for key in s} == TOP_LEVEL
    assert {t.get("type", "function") for s in seen for t in s.get("tools", [])} == {"function", "mcp"}
    assert sum(len(s) >= 5 for s in seen) >= 50  # many fields at once, not one at a time


# --- model names ------------------------------------------------------------------------------------------------------


def test_every_model_name_of_the_types_is_served_as_session_model():
    sim = new_session()
    for model in SESSION_MODELS:
        (updated,) = of_type(update(sim, model=model), "session.updated")
        assert updated["session"]["model"] == model


@pytest.mark.parametrize("model", ["", "no such model", "x" * 129, "gpt/realtime", "gpt-realtime\n"])
def test_a_malformed_session_model_is_model_not_found_and_changes_nothing(model):
    sim = new_session()
    before = json.dumps(sim.session)
    assert [(e["code"], e["param"]) for e in errors(update(sim, model=model))] == [("model_not_found", "session.model")]
    assert json.dumps(sim.session) == before


# --- MCP entries ------------------------------------------------------------------------------------------------------

DEEPWIKI = {"type": "mcp", "server_label": "deepwiki", "server_url": "https://mcp.deepwiki.com/mcp",
            "allowed_tools": ["ask_question", "read_wiki_structure"], "require_approval": "never"}


def _listings(out: list[dict]) -> list[tuple[str, list[str]]]:
    return [(e["item"]["server_label"], [t["name"] for t in e["item"]["tools"]])
            for e in of_type(out, "conversation.item.done") if e["item"]["type"] == "mcp_list_tools"]


def test_an_mcp_entry_is_listed_when_new_or_changed_not_when_resent():
    sim = new_session()
    assert _listings(update(sim, tools=[DEEPWIKI])) == [("deepwiki", ["ask_question", "read_wiki_structure"])]
    assert _listings(update(sim, tools=[DEEPWIKI], instructions="again")) == []  # as the SDKs resend it
    assert _listings(update(sim, tools=[{"name": "lookup"}, DEEPWIKI])) == []
    narrowed = {**DEEPWIKI, "allowed_tools": {"tool_names": ["ask_question"], "read_only": True}}
    assert _listings(update(sim, tools=[narrowed])) == [("deepwiki", ["ask_question"])]
    assert _listings(update(sim, tools=[])) == []
    assert _listings(update(sim, tools=[narrowed])) == [("deepwiki", ["ask_question"])]
    connector = {"type": "mcp", "server_label": "drive", "connector_id": "connector_googledrive", "authorization": "t"}
    assert _listings(update(sim, tools=[narrowed, connector])) == [("drive", [])]  # names no tools: lists none


def test_the_list_item_is_a_conversation_item_the_sdk_can_retrieve_and_a_turn_still_works():
    sim = new_session(vad=False)
    progress = of_type(update(sim, tools=[DEEPWIKI]), "mcp_list_tools.in_progress")[0]
    # @openai/agents-realtime retrieves the item when it sees mcp_list_tools.in_progress.
    (retrieved,) = of_type(send(sim, 0.0, type="conversation.item.retrieve", item_id=progress["item_id"]),
                           "conversation.item.retrieved")
    assert retrieved["item"]["type"] == "mcp_list_tools" and len(retrieved["item"]["tools"]) == 2
    send(sim, 0.0, **user_text("hello there"))
    out = send(sim, 0.0, type="response.create", response={
        "tools": [DEEPWIKI], "tool_choice": {"type": "mcp", "server_label": "deepwiki", "name": "ask_question"},
        "reasoning": {"effort": "low"}, "parallel_tool_calls": False})
    out += run_until_idle(sim, 0.0)
    assert not errors(out)
    (done,) = of_type(out, "response.done")
    assert done["response"]["status"] == "completed" and done["response"]["output"][0]["type"] == "message"


# --- bad values keep the service's codes --------------------------------------------------------------------------

BAD = [
    ({"reasoning": {"effort": "max"}}, "invalid_value", "session.reasoning.effort"),
    ({"reasoning": None}, "invalid_type", "session.reasoning"),
    ({"parallel_tool_calls": "yes"}, "invalid_type", "session.parallel_tool_calls"),
    ({"parallel_tool_calls": None}, "invalid_type", "session.parallel_tool_calls"),
    ({"tools": [{**DEEPWIKI, "colour": "red"}]}, "unknown_parameter", "session.tools[0].colour"),
    ({"tools": [{**DEEPWIKI, "require_approval": "sometimes"}]}, "invalid_value", "session.tools[0].require_approval"),
    ({"tools": [{**DEEPWIKI, "connector_id": "connector_myspace"}]}, "invalid_value", "session.tools[0].connector_id"),
    ({"tools": [{"type": "mcp", "server_url": "https://x"}]}, "missing_required_parameter", "session.tools[0].server_label"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "missing_required_parameter", "session.tools[0].server_url"),
    ({"tools": [{"type": "web_search"}]}, "invalid_value", "session.tools[0].type"),
    ({"tool_choice": {"type": "mcp"}}, "missing_required_parameter", "session.tool_choice.server_label"),
    ({"truncation": {"type": "retention_ratio", "retention_ratio": 1.5}}, "decimal_above_max_value",
     "session.truncation.retention_ratio"),
    ({"truncation": {"type": "retention_ratio", "retention_ratio": 0.5, "token_limits": {"post_instructions": 0}}},
     "integer_below_min_value", "session.truncation.token_limits.post_instructions"),
    ({"tracing": {"workflow_name": 5}}, "invalid_type", "session.tracing.workflow_name"),
    ({"prompt": {"version": "1"}}, "missing_required_parameter", "session.prompt.id"),
    ({"prompt": {"id": "p", "variables": {"v": {"type": "input_image"}}}}, "missing_required_parameter",
     "session.prompt.variables.v.detail"),
    ({"audio": {"input": {"transcription": {"delay": "soon"}}}}, "invalid_value", "session.audio.input.transcription.delay"),
    ({"audio": {"output": {"format": {"type": "audio/opus"}}}}, "invalid_value", "session.audio.output.format"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "invalid_value",
     "session.audio.input.format.rate"),
    ({"audio": {"input": {"format": {"type": "audio/pcmu", "rate": 8000}}}}, "unknown_parameter",
     "session.audio.input.format.rate"),
]


@pytest.mark.parametrize("change, code, param", BAD, ids=[p for _, _, p in BAD])
def test_bad_values_of_the_ga_fields_get_the_service_codes_and_change_nothing(change, code, param):
    sim = new_session()
    before = json.dumps(sim.session)
    assert [(e["code"], e["param"]) for e in errors(update(sim, **change))] == [(code, param)]
    assert json.dumps(sim.session) == before
