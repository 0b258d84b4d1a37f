"""Parsing Realtime events, and turning bad input into the error events the real service sends."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from relay.protocol import models as m


def _types_of(union: Any) -> dict[str, type[BaseModel]]:
    """`{"session.update": SessionUpdate, ...}` from a Union of event models."""
    table = {}
    for cls in typing.get_args(union):
        (event_type,) = typing.get_args(cls.model_fields["type"].annotation)
        table[event_type] = cls
    return table


CLIENT_EVENT_TYPES: dict[str, type[BaseModel]] = _types_of(m.ClientEvent)
SERVER_EVENT_TYPES: dict[str, type[BaseModel]] = _types_of(m.ServerEvent)


class ProtocolError(Exception):
    """A client event the service refuses. `detail()` is the `error` object of the event to send back."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.error_type = error_type

    def detail(self) -> dict[str, Any]:
        return {
            "type": self.error_type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "event_id": self.event_id,
        }


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate!r}")
    return obj


def loads(data: str | bytes) -> Any:
    """Strict JSON: NaN and Infinity are refused (a browser's JSON.parse would choke on them when echoed back), and
    so are duplicate keys: parsers differ on which one wins, so an event checked here could mean something else to
    the service it is forwarded to."""
    return json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


# --- client events -----------------------------------------------------------------------------------------------


def client_event_envelope(data: str | bytes | dict[str, Any]) -> dict[str, Any]:
    """The first check of a client event: a JSON object whose `type` is one of the client events. Nothing about
    its other fields. Raises ProtocolError (`invalid_json`, `missing_required_parameter`, `invalid_value`)."""
    if isinstance(data, (str, bytes)):
        try:
            data = loads(data)
        except ValueError as exc:
            raise ProtocolError(
                "invalid_json", f"The server failed to parse the event: {exc}. The event must be a JSON object."
            ) from None
        except RecursionError:
            raise ProtocolError("invalid_json", "The event is nested too deeply.") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", "The event must be a JSON object.")
    event_type = data.get("type")
    if not (isinstance(event_type, str) and event_type in CLIENT_EVENT_TYPES):
        event_id = event_id_of(data)
        if event_type is None:
            raise ProtocolError("missing_required_parameter", "Missing required parameter: 'type'.", "type", event_id)
        supported = ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
        raise ProtocolError(
            "invalid_value", f"Invalid value: '{event_type}'. Supported values are: {supported}.", "type", event_id
        )
    return data


def event_id_of(event: dict[str, Any]) -> str | None:
    return event["event_id"] if isinstance(event.get("event_id"), str) else None


def parse_client_event(data: str | bytes | dict[str, Any]) -> m.ClientEvent:
    """Parse and validate one client event the way the real service does.

    Raises ProtocolError with the service's error code: `invalid_json`, `invalid_value` (unknown type),
    `unknown_parameter`, `missing_required_parameter`, `invalid_type`, `integer_below_min_value`, ...
    """
    data = client_event_envelope(data)
    event_id = event_id_of(data)
    try:
        event = CLIENT_EVENT_TYPES[data["type"]].model_validate(data)
    except ValidationError as exc:
        raise error_from_validation(exc, event_id) from None
    except RecursionError:
        raise ProtocolError("invalid_value", "The event is nested too deeply.", None, event_id) from None
    unknown = unknown_fields(event)
    if unknown:
        raise ProtocolError("unknown_parameter", f"Unknown parameter: '{unknown[0]}'.", unknown[0], event_id)
    return event


def unknown_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths of every key a model tree holds that its models do not declare."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        for key in value.model_extra or {}:
            found.append(f"{path}{key}")
        for name in value.model_fields_set:
            found += unknown_fields(getattr(value, name), f"{path}{name}.")
    elif isinstance(value, list):
        stem = path[:-1]
        for index, item in enumerate(value):
            found += unknown_fields(item, f"{stem}[{index}].")
    return found


# Pydantic puts union members and discriminator tags into error locations; the API's `param` has neither.
_TAG_WORDS = frozenset(
    ["system", "user", "assistant", "function_call", "function_call_output", "input_text", "input_audio",
     "input_image", "output_text", "output_audio", "server_vad", "semantic_vad", "audio/pcm", "audio/pcmu",
     "audio/pcma", "function", "mcp", "mcp_list_tools", "input_file", "tool_choice_mode", "int", "float", "str",
     "bool", "list", "dict", "none"]
)


_VALIDATOR_LABELS = ("constrained-", "function-", "json-or-python")


def _param_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for piece in loc:
        if isinstance(piece, int):
            parts[-1:] = [f"{parts[-1]}[{piece}]"] if parts else [f"[{piece}]"]
        elif piece in _TAG_WORDS or "[" in piece or piece.startswith(_VALIDATOR_LABELS) or piece[:1].isupper():
            continue
        else:
            parts.append(piece)
    return ".".join(parts)


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


_TYPE_ERRORS = frozenset(["int_type", "float_type", "string_type", "model_type"])


def _depth(param: str) -> int:
    return param.count(".") + param.count("[") + 1


def error_from_validation(exc: ValidationError, event_id: str | None) -> ProtocolError:
    """The first pydantic error as the service would word it."""
    errors = exc.errors(include_url=False)
    # A union reports one error per member. The member that got furthest into the value is the one the client
    # meant (`truncation: {"type": "retention_ratio", ...}` is not a bad "auto"), and a bad *value* is more
    # telling than a wrong type. The first such error wins.
    error = max(errors, key=lambda e: (_depth(_param_path(e["loc"])), e["type"] not in _TYPE_ERRORS))
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    param = _param_path(error["loc"])
    if kind == "missing":
        return ProtocolError("missing_required_parameter", f"Missing required parameter: '{param}'.", param, event_id)
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        bound = ctx.get("ge", ctx.get("gt", ctx.get("le", ctx.get("lt"))))
        number = "decimal" if isinstance(bound, float) else "integer"  # the field's type, not the value's
        side = "below_min" if kind.startswith("greater") else "above_max"
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        return ProtocolError(
            f"{number}_{side}_value",
            f"Invalid '{param}': {number} {side.replace('_', ' ')}imum value. "
            f"Expected a value {op} {bound}, but got {given} instead.",
            param,
            event_id,
        )
    if kind in {"literal_error", "enum", "union_tag_invalid"}:
        expected = ctx.get("expected") or ctx.get("expected_tags") or ""
        return ProtocolError(
            "invalid_value", f"Invalid value: '{_shown(given if kind != 'union_tag_invalid' else ctx.get('tag'))}'. "
            f"Supported values are: {expected}.", param, event_id,
        )
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in {"union_tag_not_found", "model_attributes_type"}:
        return ProtocolError(
            "invalid_type", f"Invalid type for '{param}': got {_shown(json.dumps(given, default=str))}.", param, event_id
        )
    return ProtocolError("invalid_value", f"Invalid value for '{param}': {error['msg']}.", param, event_id)


# --- server events -----------------------------------------------------------------------------------------------


@dataclass
class UnknownServerEvent:
    """A server event the models do not know, or one that does not fit them. Passed on untouched."""

    data: dict[str, Any]
    problem: str | None = None  # set when the type is known but the event does not validate
    type: str = field(init=False)

    def __post_init__(self) -> None:
        self.type = str(self.data.get("type"))


def parse_server_event(data: str | bytes | dict[str, Any]) -> m.ServerEvent | UnknownServerEvent:
    """Parse one server event. Unknown or malformed events come back as UnknownServerEvent, never an exception,
    except for text that is not a JSON object at all (ValueError)."""
    if isinstance(data, (str, bytes)):
        try:
            data = loads(data)
        except RecursionError:
            raise ValueError("a server event nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("a server event must be a JSON object")
    event_type = data.get("type")
    cls = SERVER_EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    if cls is None:
        return UnknownServerEvent(data)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        return UnknownServerEvent(data, problem=str(error_from_validation(exc, None)))
    except RecursionError:
        return UnknownServerEvent(data, problem="nested too deeply")
